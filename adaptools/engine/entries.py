"""What a merge plan is made of: one :class:`Entry` per output tensor (how its value is made and stored),
laid out in :class:`ShardPlan` s, and the :class:`MergePlan` that holds them with the output's config.
:mod:`.plan` builds them; compute, writer and finalize read them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint import INDEX, SINGLE, Checkpoint
from ..interfaces import Backend, OutputContainer, TensorUpdate
from ..safetensors_io import TensorSpec
from .options import MergeInput, MergeOptions

COPY, CAST, MERGE = "copy", "cast", "merge"
#: Update kinds in the order the engine applies them; adapters keep their order within a kind.
KIND_ORDER = {"undo": -1, "replace": 0, "replace_module": 0, "delta": 1, "replace_rows": 2, "output_map": 3}
#: Update kinds that change the stored tensor itself, so a tied alias (lm_head) sees them too.
STORAGE_KINDS = ("replace", "replace_rows")


@dataclass(frozen=True)
class GroupOutput:
    """A parameter written as a backend's group of tensors (a quantized weight) instead of one tensor."""

    backend: Backend
    settings: Mapping[str, Any]


@dataclass
class Entry:
    """One output parameter: where its value comes from and how it is encoded.

    ``source`` is the stored parameter read (itself, or the tensor a tied ``lm_head`` shares); ``dtype``
    and ``shape`` describe the dense value (for a group output, the value that is encoded).
    """

    name: str
    action: str  # COPY, CAST or MERGE
    source: str
    shape: tuple[int, ...]
    dtype: str  # safetensors code of the dense output
    chain: tuple[TensorUpdate, ...] = ()
    decoder: Backend | None = None
    encoder: Backend | None = None
    group: GroupOutput | None = None
    survival: bool = False
    note: str = ""

    @property
    def merged(self) -> bool:
        return self.action == MERGE

    @property
    def spec(self) -> TensorSpec | None:
        """The written tensor's spec, or None when only encoding tells its size (a group)."""
        return None if self.group is not None else TensorSpec(self.dtype, self.shape)


@dataclass(frozen=True)
class Slot:
    """A place in an output shard: an entry's encoded output, or one stored tensor copied unchanged."""

    entry: Entry
    raw: str | None = None


@dataclass
class ShardPlan:
    name: str
    slots: list[Slot] = field(default_factory=list)

    @property
    def deferred(self) -> bool:
        """True when some tensor's size is known only after encoding (the header is written last)."""
        return any(s.raw is None and s.entry.group is not None for s in self.slots)


@dataclass
class MergePlan:
    checkpoint: Checkpoint
    inputs: Sequence[MergeInput]
    options: MergeOptions
    entries: dict[str, Entry]
    shards: list[ShardPlan]
    config: dict[str, Any]
    config_changes: dict[str, Any]
    files: list[Path]
    untied: bool = False
    vocab_size: int | None = None
    seconds: float = 0.0  # how long planning took, for the profile
    warnings: list[str] = field(default_factory=list)  # what the methods say a merge assumed
    container: OutputContainer | None = None  # where the output goes (None: the checkpoint folder)

    @property
    def write_index(self) -> bool:
        if self.container is not None and not self.container.directory:
            return False
        return len(self.shards) > 1 or (self.checkpoint.index is not None and self.shards[0].name != SINGLE)

    def slot_bytes(self, slot: Slot) -> int:
        """Bytes a slot writes (for a group, an estimate: the stored group, or half a byte a weight)."""
        if slot.raw is not None:
            return self.checkpoint.location[slot.raw][1].nbytes
        spec = slot.entry.spec
        if spec is not None:
            return spec.nbytes
        if slot.entry.name in self.checkpoint.groups:
            names = [slot.entry.name, *self.checkpoint.groups[slot.entry.name][1]]
            return sum(self.checkpoint.location[n][1].nbytes for n in names if n in self.checkpoint.location)
        numel = 1
        for d in slot.entry.shape:
            numel *= d
        return numel // 2 + 64

    @property
    def total_bytes(self) -> int:
        return sum(self.slot_bytes(slot) for shard in self.shards for slot in shard.slots)

    def to_json(self) -> dict[str, Any]:
        """What a dry run prints: what would be merged, cast, copied, untied, resized and written."""
        by_action: dict[str, list[str]] = {COPY: [], CAST: [], MERGE: []}
        for entry in self.entries.values():
            by_action[entry.action].append(entry.name)
        resized = {e.name: [list(self.checkpoint.tensor(e.source).shape), list(e.shape)]
                   for e in self.entries.values() if tuple(self.checkpoint.tensor(e.source).shape) != e.shape}
        return {
            "base": str(self.checkpoint.path),
            "operation": self.options.operation,
            "container": self.container.name if self.container is not None else "safetensors",
            "adapters": [{"source": i.adapter.source, "method": i.adapter.method, "weight": i.weight,
                          **({"removed": True} if i.invert else {})} for i in self.inputs],
            "tensors": len(self.entries),
            "merged": by_action[MERGE],
            "cast": by_action[CAST],
            "copied": len(by_action[COPY]),
            "untied": [e.name for e in self.entries.values() if e.note.startswith("untied")],
            "resized": resized,
            "survival_reported": [e.name for e in self.entries.values() if e.survival],
            "config_changes": self.config_changes,
            "warnings": self.warnings,
            "shards": [{"file": s.name, "tensors": sum(1 for x in s.slots),
                        "bytes": sum(self.slot_bytes(x) for x in s.slots), "estimated": s.deferred}
                       for s in self.shards],
            "index": INDEX if self.write_index else None,
            "files_copied": [p.name for p in self.files],
        }


