"""One GGUF model file as a merge's output (``merge BASE.gguf ADAPTER OUT.gguf``, ``merge BASE ADAPTER OUT
--to gguf``): the container the merge engine writes through, and its streaming writer.

From a GGUF base, the file is the base's: every metadata key kept (plus ``adaptools.provenance``, near the
start so that ``--force`` recognises the file as ours: :meth:`GGUFContainer.owns`), every tensor in the
base's order, untouched ones copied byte for byte, changed ones re-encoded (their own type where gguf-py
encodes it, else Q8_0, or ``--outtype``), and the plan warns about every changed tensor whose type changed
(docs/gguf.md, "Merging into a GGUF base"). From a dense Hugging Face base, ``export.py`` says which tensors
and metadata llama.cpp's converter would write.

The writer declares every tensor (gguf-py's ``GGUFWriter``: header, metadata, tensor infos) before the
first byte of data, so the sizes come from the plan, then streams the tensors in order, one at a time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from adaptools import plugin
from adaptools.plugin import InputError, UnsupportedOperationError

from .arch import ModelShape, to_gguf_layout
from .backend import GGUFBackend, settings_for
from .codec import MAGIC, OUTTYPES, changed_type, nbytes

PROVENANCE = "adaptools.provenance"
#: How far into a GGUF file its key-value metadata is searched for adaptools' keys (:meth:`GGUFContainer.owns`).
SNIFF_BYTES = 1 << 20


@dataclass
class Spec:
    """One tensor of the output file, declared before any data is written."""

    key: str  # the slot's name in the plan (a raw tensor, or an entry)
    name: str  # GGUF name
    qtype: Q
    shape: tuple[int, ...]  # numpy order
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None  # for a dense entry: HF value -> stored

    @property
    def nbytes(self) -> int:
        return nbytes(self.qtype, self.shape)


def outtype_of(options: Any, default: Q | None = None) -> Q | None:
    """``--outtype`` as a GGUF type (``default`` when not given). Mind that F32 is 0: test with ``is None``."""
    if options.outtype is None:
        return default
    qtype = OUTTYPES.get(options.outtype.lower())
    if qtype is None:
        raise InputError(f"--outtype {options.outtype!r} is not one of {', '.join(OUTTYPES)}")
    return qtype


class GGUFContainer(plugin.OutputContainer):
    name = "gguf"
    description = "one llama.cpp GGUF model file (from a GGUF base, or a dense Llama-family base)"
    suffix = ".gguf"
    file_suffix = ".gguf"
    directory = False

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

    def prepare(self, checkpoint: plugin.Checkpoint, options: Any) -> Mapping[str, tuple[Any, Mapping[str, Any]]]:
        if options.dtype != "auto":
            raise InputError(f"--dtype {options.dtype} does not apply to a GGUF output",
                             hint="--outtype sets the type of the changed tensors (GGUF base) or of the weights "
                                  "(dense base)")
        outtype = outtype_of(options)
        backend = checkpoint.opened_by
        if backend is None:
            from .export import dense_encodings

            return dense_encodings(checkpoint, outtype_of(options, Q.F16))  # type: ignore[arg-type]
        if not isinstance(backend, GGUFBackend):
            raise UnsupportedOperationError(f"a base opened by the {backend.name!r} backend cannot be written as "
                                            "GGUF", path=checkpoint.path)
        encodings = {}
        for param in checkpoint.groups:
            settings = backend.group_settings(param, checkpoint.read_small)
            if outtype is not None:
                settings["type"] = int(changed_type(backend.stored[param].qtype, settings["shape"][-1], outtype))
            encodings[param] = (backend, settings)
        return encodings

    def warnings(self, plan: Any) -> list[str]:
        backend = plan.checkpoint.opened_by
        if not isinstance(backend, GGUFBackend):
            return []
        moved: dict[tuple[str, str], list[str]] = {}
        for entry in plan.entries.values():
            if entry.merged and entry.group is not None:
                was, now = backend.stored[entry.source].qtype, Q(entry.group.settings["type"])
                if was != now:
                    moved.setdefault((was.name, now.name), []).append(entry.group.settings["name"])
        out = []
        for (was, now), names in sorted(moved.items()):
            why = ("as asked (--outtype)" if plan.options.outtype else
                   "gguf-py has no encoder for it" if now == "Q8_0" else "its rows are not whole blocks")
            out.append(f"{len(names)} changed {was} tensor(s) written as {now} ({why}): {', '.join(names[:4])}"
                       f"{', ...' if len(names) > 4 else ''}" + ("; llama.cpp's llama-quantize can re-quantize the "
                                                                  "file" if why.startswith("gguf-py") else ""))
        return out

    def writer(self, path: Path, shard: Any, plan: Any, record: Mapping[str, Any]) -> GGUFFileWriter:
        import json

        provenance = json.dumps(record, sort_keys=True)
        backend = plan.checkpoint.opened_by
        if isinstance(backend, GGUFBackend):
            model = backend.model
            specs = [self._spec(slot, backend.model, backend) for slot in shard.slots]
            return GGUFFileWriter(path, model.family.arch, provenance, lambda w: copy_metadata(backend.reader, w),
                                  specs, alignment(backend.reader))
        from .export import dense_model, write_metadata

        model = dense_model(plan.checkpoint)
        specs = [self._spec(slot, model, None, outtype_of(plan.options, Q.F16)) for slot in shard.slots]
        return GGUFFileWriter(path, model.family.arch, provenance, lambda w: write_metadata(plan, model, specs, w),
                              specs, gguf.GGUF_DEFAULT_ALIGNMENT)

    @staticmethod
    def _spec(slot: Any, model: ModelShape, backend: GGUFBackend | None, dense_type: Q | None = None) -> Spec:
        if slot.raw is not None:
            stored = backend.stored[slot.raw]  # type: ignore[union-attr]
            return Spec(slot.raw, stored.gguf_name, stored.qtype, stored.shape)
        entry = slot.entry
        if entry.group is not None:
            s = entry.group.settings
            return Spec(entry.name, s["name"], Q(s["type"]), tuple(s["shape"]))
        # a dense entry (an lm_head untied from the embedding): named and laid out here
        name = model.gguf_name(entry.name)
        if name is None:
            raise InputError(f"{entry.name} has no GGUF name in architecture {model.family.arch}", tensor=entry.name)
        shape = tuple(to_gguf_layout(model, name, torch.empty(entry.shape, device="meta")).shape)
        if backend is not None and entry.source in backend.stored:
            qtype = changed_type(backend.stored[entry.source].qtype, shape[-1])
        else:
            qtype = changed_type(Q.F16 if dense_type is None else dense_type, shape[-1])
        settings = settings_for(model, name, shape, qtype)
        return Spec(entry.name, name, qtype, shape,
                    lambda value: GGUFBackend().encode_group(entry.name, value, settings)[entry.name])


def alignment(reader: gguf.GGUFReader) -> int:
    field = reader.get_field(gguf.Keys.General.ALIGNMENT)
    return int(field.contents()) if field is not None else gguf.GGUF_DEFAULT_ALIGNMENT


def copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter) -> None:
    """Every metadata key of the base, in its order and type (strings as their stored bytes)."""
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in (gguf.Keys.General.ARCHITECTURE, PROVENANCE):
            continue  # the header's own counts; the architecture the writer starts with; our old record
        kind = field.types[0]
        if kind == gguf.GGUFValueType.STRING:
            writer.add_key_value(field.name, bytes(field.parts[field.data[0]]), kind)
        elif kind == gguf.GGUFValueType.ARRAY:
            sub = field.types[-1]
            if len(field.types) != 2 or not field.data:
                raise UnsupportedOperationError(f"GGUF metadata {field.name} is an empty or nested array, which "
                                                "gguf-py cannot write back")
            if sub == gguf.GGUFValueType.STRING:
                value: Any = [bytes(field.parts[i]) for i in field.data]
            else:
                value = field.contents()
            writer.add_key_value(field.name, value, kind, sub)
        else:
            writer.add_key_value(field.name, field.contents(), kind)


class GGUFFileWriter:
    """Writes one GGUF file: header, metadata and tensor infos first (gguf-py's ``GGUFWriter``), then each
    declared tensor's bytes in order, aligned, one tensor in memory at a time."""

    def __init__(self, path: Path, arch: str, provenance: str, add_metadata: Callable[[gguf.GGUFWriter], None],
                 specs: Sequence[Spec], align: int):
        self.path, self.specs, self.seconds, self._next = path, list(specs), 0.0, 0
        self._gguf = gguf.GGUFWriter(path, arch)
        self._gguf.data_alignment = align
        self._gguf.add_string(PROVENANCE, provenance)  # near the start: how --force knows the file
        add_metadata(self._gguf)
        for spec in self.specs:
            byte_shape = gguf.quant_shape_to_byte_shape(spec.shape, spec.qtype)
            self._gguf.add_tensor_info(spec.name, byte_shape, np.dtype(np.uint8), spec.nbytes, raw_dtype=spec.qtype)
        self._gguf.write_header_to_file()
        self._gguf.write_kv_data_to_file()
        self._gguf.write_ti_data_to_file()
        self._fh: BinaryIO = self._gguf.fout[0]  # type: ignore[index]
        self._gguf.write_padding(self._fh, self._fh.tell())

    def _expect(self, key: str, size: int) -> Spec:
        spec = self.specs[self._next] if self._next < len(self.specs) else None
        if spec is None or spec.key != key or spec.nbytes != size:
            raise ValueError(f"{self.path}: got {key!r} ({size} bytes), declared "
                             f"{(spec.key, spec.nbytes) if spec else 'nothing'}")
        self._next += 1
        return spec

    def copy(self, name: str, src: BinaryIO, info: Any) -> None:
        """The next tensor's bytes, copied from ``src`` by the kernel where it can."""
        started = time.perf_counter()
        self._expect(name, info.nbytes)
        self._fh.flush()
        done, offset = 0, info.begin
        try:
            while done < info.nbytes:
                n = os.copy_file_range(src.fileno(), self._fh.fileno(), info.nbytes - done, offset + done)
                if n == 0:
                    break
                done += n
        except (OSError, AttributeError):
            pass
        self._fh.seek(0, os.SEEK_END)
        while done < info.nbytes:
            data = os.pread(src.fileno(), min(64 << 20, info.nbytes - done), offset + done)
            if not data:
                raise InputError("the base file ended inside a tensor", path=getattr(src, "name", None), tensor=name)
            self._fh.write(data)
            done += len(data)
        self._gguf.write_padding(self._fh, info.nbytes)
        self.seconds += time.perf_counter() - started

    def write(self, name: str, tensor: torch.Tensor, done: Callable[[], None] | None = None) -> None:
        spec = self.specs[self._next] if self._next < len(self.specs) else None
        if spec is not None and spec.encode is not None and spec.key == name:
            tensor = spec.encode(tensor)
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        started = time.perf_counter()
        self._expect(name, data.size)
        self._fh.write(memoryview(data))
        self._gguf.write_padding(self._fh, data.size)
        self.seconds += time.perf_counter() - started
        if done is not None:
            done()

    def __enter__(self) -> GGUFFileWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        complete = self._next == len(self.specs)
        self._gguf.close()
        if exc_type is None and not complete:
            raise ValueError(f"{self.path}: closed after {self._next} of {len(self.specs)} tensors")


CONTAINER = GGUFContainer()
