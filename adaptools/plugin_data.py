"""The data that passes between the core and plugins: what a base looks like, what a method does to it,
what a check finds, what a validator decides. Plain data classes, checked when they are made, so a
plugin's mistake (a misspelled update kind, an unknown severity) shows at its source with its name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from .errors import PluginContractError
from .schema import Adapter


class UpdateKind(str, Enum):
    """How a :class:`TensorUpdate` composes with the others on the same parameter. The merge applies
    replacements, then deltas, then row replacements, then output maps, adapters in order within each.
    Undos (the inverses an unmerge asks for) run before all of them, in the exact reverse of that order."""

    REPLACE = "replace"  # the stored tensor itself is replaced (a tied alias sees it)
    REPLACE_MODULE = "replace_module"  # one module's copy is replaced (PEFT modules_to_save); ties do not follow
    DELTA = "delta"  # any function of the current value (LoRA, DoRA, biases, multiplicative updates)
    REPLACE_ROWS = "replace_rows"  # some rows are replaced (trainable tokens); ties follow, as in PEFT
    OUTPUT_MAP = "output_map"  # a map of the layer's output, acting after every other change
    UNDO = "undo"  # takes a merged adapter's change back out (unmerge, swap): before everything, set by the engine


#: Finding severities, most severe first.
SEVERITIES = ("error", "warning", "info")


@dataclass
class LowRank:
    """A module's delta as a product: ``delta = b @ a`` (``b`` [out, r] with the scaling folded in, ``a``
    [r, in]), in the layout the method stores (``kind`` says which: linear, embedding, conv).

    A conv module's factors are matrices too, so that every operation treats all kinds alike: ``a`` holds
    [r, in·kh·kw] (the conv weight [r, in, kh, kw] flattened as torch flattens it) and ``kernel`` the
    kernel size (kh, kw) the method reshapes it back with; ``b`` is the 1x1 conv's [out, r]."""

    b: torch.Tensor
    a: torch.Tensor
    kind: str = "linear"
    kernel: tuple[int, ...] = ()

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass(frozen=True)
class ReadOptions:
    """How a format reader may read its input."""

    allow_pickle: bool = False  # unpickle legacy .bin files (weights_only=True only)
    validate: bool = True  # check tensors against config, and values for NaN/Inf
    base: str | None = None  # the base model, for formats that need it to read (GGUF: attention head counts)


@dataclass(frozen=True)
class WriteOptions:
    """What a format writer may need beyond the adapter (a GGUF writer needs the base's architecture)."""

    base: str | None = None  # the base model (a folder or hub reference) the adapter belongs to
    outtype: str | None = None  # the storage type, for formats that offer several
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BaseTensor:
    """One tensor of a base checkpoint, known from headers only."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass
class BaseInfo:
    """What a method may know about a base checkpoint before any weight is read.

    ``tensors`` holds what is stored on disk; ``aliases`` maps a parameter that is tied to another and not
    stored (``lm_head.weight`` under ``tie_word_embeddings``) to the tensor that holds its values.
    """

    tensors: dict[str, BaseTensor]
    config: dict[str, Any] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    path: str = "<base>"

    def find(self, name: str) -> BaseTensor | None:
        """The stored tensor that holds parameter ``name``, following ties; None if the base lacks it."""
        if name in self.tensors:
            return self.tensors[name]
        stored = self.aliases.get(name)
        if stored is not None:
            t = self.tensors[stored]
            return BaseTensor(name, t.dtype, t.shape)
        return None

    def locate(self, module: str, param: str) -> str | None:
        """The base parameter name for ``module.param``, tolerating a head-class prefix difference.

        An adapter trained on ``LlamaForCausalLM`` names ``model.layers.0...``; a checkpoint saved from
        ``LlamaModel`` names ``layers.0...`` (docs/peft.md, "Module paths"). Returns None if nothing fits.
        """
        head, _, rest = module.partition(".")
        candidates = [module]
        if rest:
            candidates.append(rest)
        candidates += [f"{prefix}.{module}" for prefix in ("model", "transformer")]
        for candidate in candidates:
            name = f"{candidate}.{param}"
            if self.find(name) is not None:
                return name
        return None


@dataclass(frozen=True)
class Finding:
    """One problem ``adaptools check`` reports: which rule, how bad, where, and the one-line fix."""

    rule: str
    severity: str  # error | warning | info
    message: str
    fix: str
    path: str | None = None
    tensor: str | None = None
    field: str | None = None

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise PluginContractError(f"finding {self.rule} has severity {self.severity!r}",
                                      hint=f"use one of {', '.join(SEVERITIES)}")


#: An update to one base tensor: given the current value and the original (both fp32), return the new one.
UpdateFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TensorUpdate:
    """What a method does to one base parameter during a merge.

    ``kind`` (an :class:`UpdateKind` or its string value) says how the update composes with others.

    ``fn(current, original)`` gets fp32 tensors on the merge device and returns the new value; it may
    modify ``current`` in place but never ``original``. ``rows``, when given, is the same update restricted
    to a block of rows (``rows(current_rows, row_slice)``), which lets the merge stream a large tensor
    through the CPU cache block by block; it must give bit-identical results to ``fn``. ``row_delta``, when
    given for a ``delta``, is what ``rows`` adds, written into a scratch block (``row_delta(row_slice, out)``
    returns ``out`` holding the block's delta): ``rows(current, sl)`` must equal ``current + row_delta(sl, ·)``
    bit for bit. The engine then adds it to its own decoded block, allocating nothing per block.
    """

    target: str
    kind: UpdateKind | str
    fn: UpdateFn
    shape: tuple[int, ...] | None = None  # the result's shape when it differs from the base's
    source: str = ""  # which adapter tensors, for messages
    rows: Callable[[torch.Tensor, slice], torch.Tensor] | None = None
    needs_original: bool = False  # fn reads ``original`` (DoRA norms), so it must not alias ``current``
    row_delta: Callable[[slice, torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        try:
            self.kind = UpdateKind(self.kind)
        except ValueError:
            raise PluginContractError(f"update of {self.target} has kind {self.kind!r}",
                                      hint=f"use one of {', '.join(k.value for k in UpdateKind)}") from None


@dataclass(frozen=True)
class Verdict:
    """A validator's answer: passed or not, figures for machines, a sentence for people."""

    passed: bool
    message: str
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class ValidationContext:
    """What an operation hands a validator: its inputs, its output and the user's options."""

    operation: str
    base: str | None
    adapters: list[Adapter]
    output: str | None
    options: dict[str, Any] = field(default_factory=dict)
