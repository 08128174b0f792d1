"""The streaming writer of one GGUF model file, the writer the GGUF container (``container.py``) hands the
merge engine for its one shard.

gguf-py's ``GGUFWriter`` declares every tensor (header, metadata, tensor infos) before the first byte of
data, so each tensor is declared up front as a :class:`Spec` whose size comes from the plan; the bytes then
stream in the plan's order, one tensor in memory at a time, untouched ones copied from the base by the
kernel where it can.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from adaptools.plugin import InputError, TensorInfo

from .codec import nbytes
from .split import SPLIT_COUNT, SPLIT_NO, SPLIT_TENSORS

#: The metadata key holding the run's provenance, written right after ``general.architecture`` so that
#: ``--force`` finds it (``GGUFContainer.owns`` searches the start of a file for adaptools' keys).
PROVENANCE = "adaptools.provenance"


class RawValue(NamedTuple):
    """A metadata value given as the bytes a GGUF file stores after its type (a copied key: ``fields.py``),
    written unchanged."""

    data: bytes


class _Writer(gguf.GGUFWriter):
    """gguf-py's writer, which also writes a :class:`RawValue` as its bytes (gguf-py packs every other value
    itself, in ``_pack_val``)."""

    def _pack_val(self, val: Any, vtype: gguf.GGUFValueType, add_vtype: bool,
                  sub_type: gguf.GGUFValueType | None = None) -> bytes:
        if isinstance(val, RawValue):
            return (self._pack("I", vtype) if add_vtype else b"") + val.data
        return super()._pack_val(val, vtype, add_vtype, sub_type)


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


class GGUFFileWriter:
    """Writes one GGUF file: header, metadata and tensor infos first (gguf-py's ``GGUFWriter``), then each
    declared tensor's bytes in order, aligned, one tensor in memory at a time."""

    def __init__(self, path: Path, arch: str, provenance: str, add_metadata: Callable[[gguf.GGUFWriter], None],
                 specs: Sequence[Spec], align: int, split: tuple[int, int, int] | None = None):
        """``split``: this file is part ``no`` (0-based) of ``count`` of a split model of ``tensors`` tensors in
        all. The first part holds every metadata key, the others only the split keys (and, like every part,
        the provenance, so that ``--force`` knows each one) and GGUF's default alignment, as llama.cpp's
        gguf-split writes them (docs/gguf.md, "Split models")."""
        self.path, self.specs, self.seconds, self._next = path, list(specs), 0.0, 0
        self._gguf = _Writer(path, arch)
        self._gguf.data_alignment = align
        if split is not None and split[0] > 0:  # only the first part says the architecture and the alignment:
            self._gguf.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # the others are aligned to
            self._gguf.data_alignment = gguf.GGUF_DEFAULT_ALIGNMENT  # GGUF's default, as readers read them
        self._gguf.add_string(PROVENANCE, provenance)  # near the start: how --force knows the file
        if split is None or split[0] == 0:
            add_metadata(self._gguf)
        if split is not None:  # last, as gguf-py's and llama.cpp's split writers add them
            no, count, tensors = split
            self._gguf.add_uint16(SPLIT_NO, no)
            self._gguf.add_uint16(SPLIT_COUNT, count)
            self._gguf.add_int32(SPLIT_TENSORS, tensors)
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

    def copy(self, name: str, src: BinaryIO, info: TensorInfo) -> None:
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
        self._fh.write(data.data)
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
