"""One GGUF model file as a merge's output (``merge BASE.gguf ADAPTER OUT.gguf``, ``merge BASE ADAPTER OUT
--to gguf``): the container the merge engine writes through.

From a GGUF base, the file is the base's: every metadata key kept (plus ``adaptools.provenance``, near the
start so that ``--force`` recognises the file as ours: :meth:`GGUFContainer.owns`), every tensor in the
base's order, untouched ones copied byte for byte, changed ones re-encoded (their own type where we encode
it, K-quants included, else Q8_0, or ``--outtype``), and the plan warns about every changed tensor whose type changed
(docs/gguf.md, "Merging into a GGUF base"). From a dense Hugging Face base, ``export.py`` says which tensors
and metadata llama.cpp's converter would write. ``writer.py`` streams the file.

The backend that offers this container (``backend.py``) hands itself over as the encoder of a dense base's
tensors; a GGUF base's own backend, the one that opened it, encodes that base's tensors (so that the engine
copies the untouched ones). This module reads the base through :class:`~.layout.GGUFBase` and never imports
the backend.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gguf
import torch
from gguf import GGMLQuantizationType as Q

from adaptools import plugin
from adaptools.plugin import InputError, UnsupportedOperationError

from . import native
from .arch import ModelShape, to_gguf_layout
from .codec import MAGIC, OUTTYPES, changed_type
from .export import dense_encodings, dense_model, write_metadata
from .fields import Header
from .imatrix import ImportanceMatrix
from .imatrix import load as load_imatrix
from .layout import GGUFBase, encode_value, settings_for
from .split import KEYS as SPLIT_KEYS
from .split import MAX_PARTS as SPLIT_MAX_PARTS
from .split import part_names
from .writer import PROVENANCE, GGUFFileWriter, RawValue, Spec

#: How far into a GGUF file its key-value metadata is searched for adaptools' keys (:meth:`GGUFContainer.owns`).
SNIFF_BYTES = 1 << 20


def outtype_of(options: plugin.MergeOptions) -> Q | None:
    """``--outtype`` as a GGUF type (None when not given). Mind that F32 is 0: test with ``is None``."""
    if options.outtype is None:
        return None
    qtype = OUTTYPES.get(options.outtype.lower())
    if qtype is None:
        raise InputError(f"--outtype {options.outtype!r} is not one of {', '.join(OUTTYPES)}")
    return qtype


def imatrix_of(options: plugin.MergeOptions, base: GGUFBase | None) -> ImportanceMatrix | None:
    """``--imatrix`` read and checked (None when not given): it weights the block quants of a GGUF base's
    changed tensors, and needs the native kernel (the weighted encoders are in C only; docs/gguf.md,
    "Importance matrices")."""
    if options.imatrix is None:
        return None
    if base is None:
        raise InputError("--imatrix applies to a merge into a GGUF base (it weights the re-encoding of its "
                         "quantized tensors); a dense base is written in --outtype", hint="drop --imatrix")
    if native.LIB is None:
        raise InputError("--imatrix needs adaptools' native GGUF kernel, which is not loaded "
                         f"({native.describe()})", hint="reinstall adaptools with a C compiler, or drop --imatrix")
    return load_imatrix(options.imatrix)


def _imatrix_warnings(plan: plugin.MergePlan) -> list[str]:
    """Every changed tensor whose type takes weights checked against its imatrix entry (a size that does not
    fit is refused), and those without an entry named: they are encoded without weights, as llama-quantize
    encodes them."""
    missing: list[str] = []
    path = None
    for entry in plan.entries.values():
        settings = entry.group.settings if entry.merged and entry.group is not None else {}
        if settings.get("imatrix") and Q(settings["type"]) in native.WEIGHTED:
            path = settings["imatrix"]
            if load_imatrix(path).for_tensor(settings["name"], tuple(settings["shape"])) is None:
                missing.append(settings["name"])
    if not missing:
        return []
    return [f"{len(missing)} changed tensor(s) have no usable entry in the imatrix {path} and are encoded without "
            f"weights, as llama-quantize does: {', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}"]


def gguf_base(checkpoint: plugin.Checkpoint) -> GGUFBase | None:
    """The GGUF file a base was opened from (None: a Hugging Face folder); a file another backend opened
    is refused."""
    backend = checkpoint.opened_by
    if backend is None:
        return None
    base = getattr(backend, "base", None)
    if not isinstance(base, GGUFBase):
        raise UnsupportedOperationError(f"a base opened by the {backend.name!r} backend cannot be written as "
                                        "GGUF", path=checkpoint.path)
    return base


class GGUFContainer(plugin.OutputContainer):
    """One GGUF file; ``encoder`` is the backend that encodes a dense base's tensors."""

    name = "gguf"
    description = "one llama.cpp GGUF model file (from a GGUF base, or a dense Llama-family base)"
    # changed tensors keep their own type (a 4-bit K-quant or Q4_0 included): a wider type keeps the change
    survival_hint = "Write the changed tensors in a wider type: --outtype q8_0 (or f16)."
    splits = True  # --shard-size: parts as llama.cpp's gguf-split writes them
    suffix = ".gguf"
    file_suffix = ".gguf"
    directory = False

    def __init__(self, encoder: plugin.Backend):
        self.encoder = encoder

    def owns(self, path: Path) -> bool:
        """A GGUF file with an ``adaptools.`` key near its start: a merged model (its provenance comes right
        after ``general.architecture``) or a GGUF LoRA adaptools wrote (its adaptools keys come before the
        tensor infos)."""
        try:
            with open(path, "rb") as fh:
                head = fh.read(8)
                return head[:4] == MAGIC and b"adaptools." in head + fh.read(SNIFF_BYTES)
        except OSError:
            return False

    def prepare(self, checkpoint: plugin.Checkpoint,
                options: plugin.MergeOptions) -> Mapping[str, tuple[plugin.Backend, Mapping[str, Any]]]:
        if options.dtype != "auto":
            raise InputError(f"--dtype {options.dtype} does not apply to a GGUF output",
                             hint="--outtype sets the type of the changed tensors (GGUF base) or of the weights "
                                  "(dense base)")
        outtype = outtype_of(options)
        base = gguf_base(checkpoint)
        imatrix = imatrix_of(options, base)
        if base is None:
            return dense_encodings(checkpoint, Q.F16 if outtype is None else outtype, self.encoder)
        backend = checkpoint.opened_by  # the base's own: its untouched groups are copied byte for byte
        encodings: dict[str, tuple[plugin.Backend, Mapping[str, Any]]] = {}
        for param in checkpoint.groups:
            settings = backend.group_settings(param, checkpoint.read_small)
            if outtype is not None:
                settings["type"] = int(changed_type(base.stored[param].qtype, settings["shape"][-1], outtype))
            if imatrix is not None:
                settings["imatrix"] = str(imatrix.path)
            encodings[param] = (backend, settings)
        if imatrix is not None and not any(s.gguf_name in imatrix.weights for s in base.stored.values()):
            raise InputError("no entry of the imatrix names a tensor of this base", path=imatrix.path,
                             hint="the imatrix was made for another model; use the one made for this base")
        return encodings

    def warnings(self, plan: plugin.MergePlan) -> list[str]:
        base = gguf_base(plan.checkpoint)
        if base is None:
            return []
        for entry in plan.entries.values():  # a GGUF tensor keeps its shape, and the vocabulary its size
            if entry.group is not None and tuple(entry.shape) != tuple(base.hf_shape(entry.source)):
                raise UnsupportedOperationError(
                    f"the merge resizes {entry.name} from {list(base.hf_shape(entry.source))} to "
                    f"{list(entry.shape)} (a resized vocabulary), which a GGUF file of this base cannot hold: its "
                    "tokenizer metadata lists the old vocabulary", tensor=entry.name,
                    hint="merge into the Hugging Face checkpoint, then convert that to GGUF with llama.cpp's "
                         "convert_hf_to_gguf.py")
        out = _imatrix_warnings(plan)
        moved: dict[tuple[str, str], list[str]] = {}
        for entry in plan.entries.values():
            if entry.merged and entry.group is not None:
                was, now = base.stored[entry.source].qtype, Q(entry.group.settings["type"])
                if was != now:
                    moved.setdefault((was.name, now.name), []).append(entry.group.settings["name"])
        for (was_name, now_name), names in sorted(moved.items()):
            why = ("as asked (--outtype)" if plan.options.outtype else
                   "no encoder for its type" if now_name == "Q8_0" else "its rows are not whole blocks")
            out.append(f"{len(names)} changed {was_name} tensor(s) written as {now_name} ({why}): "
                       f"{', '.join(names[:4])}{', ...' if len(names) > 4 else ''}"
                       + ("; llama.cpp's llama-quantize can re-quantize the file" if why.startswith("no enc") else ""))
        return out

    def split(self, plan: plugin.MergePlan, max_bytes: int) -> list[plugin.ShardPlan]:
        """The file in parts as gguf-py's ``GGUFWriter(split_max_size=...)`` cuts it: a new part before a
        tensor that would take the current one past ``max_bytes`` of tensor data (metadata and padding not
        counted; a tensor larger than that is a part of its own), named as llama.cpp finds them
        (``split.py``, docs/gguf.md, "Split models")."""
        slots = [slot for shard in plan.shards for slot in shard.slots]
        groups: list[list[plugin.Slot]] = [[]]
        size = 0
        for slot, spec in zip(slots, _specs(plan, slots)):
            if groups[-1] and size + spec.nbytes > max_bytes:
                groups.append([])
                size = 0
            groups[-1].append(slot)
            size += spec.nbytes
        if len(groups) > SPLIT_MAX_PARTS:
            raise InputError(f"--shard-size {max_bytes} would split the GGUF file in {len(groups)} parts, more than "
                             f"the {SPLIT_MAX_PARTS} a split model can have", hint="give a larger --shard-size")
        name = plan.shards[0].name
        return [plugin.ShardPlan(part, group) for part, group in zip(part_names(name, len(groups)), groups)]

    def writer(self, path: Path, shard: plugin.ShardPlan, plan: plugin.MergePlan,
               record: Mapping[str, Any]) -> GGUFFileWriter:
        provenance = json.dumps(record, sort_keys=True)
        specs = _specs(plan, shard.slots)
        split = None
        if len(plan.shards) > 1:  # one part of a split file: its number, the part count, the set's tensors
            no = next(i for i, part in enumerate(plan.shards) if part is shard)
            split = (no, len(plan.shards), sum(len(part.slots) for part in plan.shards))
        base = gguf_base(plan.checkpoint)
        if base is not None:
            reader = base.reader
            return GGUFFileWriter(path, base.model.family.arch, provenance, lambda w: copy_metadata(reader, w),
                                  specs, alignment(reader), split)
        model = dense_model(plan.checkpoint)
        every = _specs(plan, [slot for part in plan.shards for slot in part.slots]) if split else specs
        return GGUFFileWriter(path, model.family.arch, provenance, lambda w: write_metadata(plan, model, every, w),
                              specs, gguf.GGUF_DEFAULT_ALIGNMENT, split)


def _specs(plan: plugin.MergePlan, slots: Sequence[plugin.Slot]) -> list[Spec]:
    """The declared tensors of ``slots``, from a GGUF base or a dense one."""
    base = gguf_base(plan.checkpoint)
    if base is not None:
        return [_spec(slot, base.model, base) for slot in slots]
    model = dense_model(plan.checkpoint)
    return [_spec(slot, model, None, outtype_of(plan.options)) for slot in slots]


def _spec(slot: plugin.Slot, model: ModelShape, base: GGUFBase | None, dense_type: Q | None = None) -> Spec:
    """The declared tensor of one slot: a stored tensor copied, a group as its settings say, or a dense
    entry (an ``lm_head`` untied from the embedding) named and laid out here, in its stored tensor's type
    or else ``dense_type`` (F16 when not given)."""
    if slot.raw is not None:
        assert base is not None  # only a GGUF base has tensors copied as stored
        stored = base.stored[slot.raw]
        return Spec(slot.raw, stored.gguf_name, stored.qtype, stored.shape)
    entry = slot.entry
    if entry.group is not None:
        s = entry.group.settings
        return Spec(entry.name, s["name"], Q(s["type"]), tuple(s["shape"]))
    name = model.gguf_name(entry.name)
    if name is None:
        raise InputError(f"{entry.name} has no GGUF name in architecture {model.family.arch}", tensor=entry.name)
    shape = tuple(to_gguf_layout(model, name, torch.empty(entry.shape, device="meta")).shape)
    if base is not None and entry.source in base.stored:
        qtype = changed_type(base.stored[entry.source].qtype, shape[-1])
    else:
        qtype = changed_type(Q.F16 if dense_type is None else dense_type, shape[-1])
    settings = settings_for(model, name, shape, qtype)
    return Spec(entry.name, name, qtype, shape, lambda value: encode_value(settings, value))


def alignment(reader: Header) -> int:
    field = reader.get_field(gguf.Keys.General.ALIGNMENT)
    return int(field.contents()) if field is not None else gguf.GGUF_DEFAULT_ALIGNMENT


def copy_metadata(reader: Header, writer: gguf.GGUFWriter) -> None:
    """Every metadata key of the base, in its order and type, its value the bytes stored (a vocabulary is
    copied, never parsed: ``fields.py``)."""
    for field in reader.fields.values():
        if field.name in (gguf.Keys.General.ARCHITECTURE, PROVENANCE) or field.name in SPLIT_KEYS:
            continue  # the architecture the writer starts with; our old record; a split base's part numbers
        writer.add_key_value(field.name, RawValue(field.raw), field.types[0],
                             field.types[1] if len(field.types) > 1 else None)
