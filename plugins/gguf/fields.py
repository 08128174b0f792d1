"""A GGUF model file's header as a merge plans from it: every metadata key and tensor info, with metadata
arrays kept as the bytes they are stored as.

gguf-py's ``GGUFReader`` builds a numpy view for every item of every metadata array as it opens a file: a
32,000-token vocabulary (tokens, scores, token types) is about 100,000 small views, seconds before the first
tensor is planned. Planning needs none of them: the keys it reads are scalars, and an output copies the
arrays unchanged. So a base is opened with :func:`open_header`, which reads the header with ``struct`` in
one pass (after :func:`.header.check_counts` has bounded every count by the file's size), decodes scalar
values, keeps each value's stored bytes for the writer to copy (``writer.RawValue``), and parses an array
only when asked (:meth:`Field.contents`). It refuses what gguf-py's reader refuses, with the same one-line
error (docs/gguf.md, "Reading a file safely"); adapters, whose tensors are read through gguf-py, still open
with :func:`.codec.open_reader`.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

from adaptools.plugin import InputError

from .header import check_counts

#: struct format of each scalar value type (little-endian).
FORMATS = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
           V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d"}


@dataclass(frozen=True)
class Field:
    """One metadata key: its types (``[ARRAY, item type]`` for an array, as gguf-py's ``ReaderField.types``),
    its value's stored bytes (after the type word), and a number's decoded value."""

    name: str
    types: list[V]
    raw: bytes
    value: Any = None

    def contents(self) -> Any:
        """The value as gguf-py's ``ReaderField.contents()`` gives it (strings decoded as UTF-8; an array as a
        list, parsed now)."""
        if self.types[0] == V.STRING:  # decoded when read, as gguf-py does: a value that is not UTF-8 is
            return self.raw[8:].decode("utf-8")  # refused only where a key is read, and copied as stored
        if self.types[0] != V.ARRAY:
            return self.value
        item, count = struct.unpack_from("<IQ", self.raw)
        if V(item) == V.STRING:
            out, at = [], 12
            for _ in range(count):
                (n,) = struct.unpack_from("<Q", self.raw, at)
                out.append(self.raw[at + 8:at + 8 + n].decode("utf-8"))
                at += 8 + n
            return out
        return np.frombuffer(self.raw, np.dtype(FORMATS[V(item)]), count, 12).tolist()


@dataclass(frozen=True)
class Tensor:
    """One tensor info: ``shape`` is ggml's ``ne`` (fastest dimension first, as gguf-py's ``ReaderTensor``),
    ``data_offset`` absolute in the file."""

    name: str
    shape: np.ndarray
    tensor_type: Q
    n_elements: int
    n_bytes: int
    data_offset: int


@dataclass
class Header:
    """What :func:`open_header` read: the keys in file order, the tensors, the data alignment and byte order."""

    fields: dict[str, Field] = field(default_factory=dict)
    tensors: list[Tensor] = field(default_factory=list)
    alignment: int = gguf.GGUF_DEFAULT_ALIGNMENT
    endianess: gguf.GGUFEndian = gguf.GGUFEndian.LITTLE

    def get_field(self, key: str) -> Field | None:
        return self.fields.get(key)


def open_header(path: Path) -> Header:
    """``path``'s header, every count bounded first; anything gguf-py's reader would refuse becomes one
    InputError naming the file."""
    check_counts(path)
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _read(data)
    except Exception as exc:  # struct.error, ValueError, UnicodeDecodeError, KeyError ... on hostile bytes
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"not a readable GGUF file ({detail[:200]})", path=path,
                         hint="the file is truncated or corrupt; write it again") from None


class _Cursor:
    def __init__(self, data: mmap.mmap):
        self.data, self.at = data, 0

    def take(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.data, self.at)
        self.at += struct.calcsize(fmt)
        return value

    def string(self) -> bytes:
        n = self.take("<Q")
        if self.at + n > len(self.data):
            raise ValueError("a string runs past the end of the file")
        self.at += n
        return bytes(self.data[self.at - n:self.at])


def _read(data: mmap.mmap) -> Header:
    cur = _Cursor(data)
    if cur.take("<I") != gguf.GGUF_MAGIC:
        raise ValueError("GGUF magic invalid")
    version = cur.take("<I")
    if version & 0xFFFF == 0:  # written in the other byte order: the backend refuses it by this
        return Header(endianess=gguf.GGUFEndian.BIG)
    if version not in gguf.READER_SUPPORTED_VERSIONS:
        raise ValueError(f"Sorry, file appears to be version {version} which we cannot handle")
    n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
    header = Header()
    for _ in range(n_kv):
        name = cur.string().decode("utf-8")
        if name in header.fields:
            raise KeyError(f"Duplicate {name}")
        kind = V(cur.take("<I"))
        start = cur.at
        types, value = [kind], None
        if kind == V.STRING:
            cur.string()
        elif kind == V.ARRAY:
            item = V(cur.take("<I"))
            count = cur.take("<Q")
            types.append(item)
            if item == V.STRING:
                for _ in range(count):
                    cur.string()
            elif item in FORMATS:
                cur.at += count * struct.calcsize(FORMATS[item])
            else:
                raise ValueError(f"Unknown/unhandled field type {item}")
        else:
            value = cur.take(FORMATS[kind])
        if cur.at > len(data):
            raise ValueError("a metadata value runs past the end of the file")
        header.fields[name] = Field(name, types, bytes(data[start:cur.at]), value)
    align = header.fields.get(gguf.Keys.General.ALIGNMENT)
    if align is not None:
        if align.types != [V.UINT32]:
            raise ValueError("Bad type for general.alignment field")
        if align.value == 0 or align.value & (align.value - 1):
            raise ValueError("Invalid alignment: must be a non-zero power of two")
        header.alignment = align.value
    infos = []
    for _ in range(n_tensors):
        name = cur.string().decode("utf-8")
        dims = cur.take("<I")
        ne = [cur.take("<Q") for _ in range(dims)]
        infos.append((name, ne, cur.take("<I"), cur.take("<Q")))
    start = -(-cur.at // header.alignment) * header.alignment
    names: set[str] = set()
    for name, ne, raw_type, offset in infos:
        if name in names:
            raise ValueError(f"Found duplicated tensor with name {name}")
        names.add(name)
        qtype = Q(raw_type)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        if not ne or ne[0] % block:
            raise ValueError(f"{name}: {ne[0] if ne else 0} values a row are not whole {qtype.name} blocks")
        n = math.prod(ne)
        header.tensors.append(Tensor(name, np.array(ne, dtype=np.uint64), qtype, n, n * size // block, start + offset))
    return header
