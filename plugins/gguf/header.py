"""Every count in a GGUF file's header bounded by what the file can hold, before gguf-py parses it.

gguf-py trusts the counts it reads: a metadata array that declares 2^50 items, or 2^60 tensors, makes it
read, allocate and loop far past the end of the file (memory grows until the machine gives out). This walk
reads only the header's fixed-size fields with ``struct``, checks each count against the bytes left, and
refuses the first that cannot fit, in time proportional to the header, then checks that every tensor of a
known type ends inside the file, naming the first that does not (docs/gguf.md, "Reading a file safely").
It does not interpret values; :func:`.codec.open_reader` runs it and then gguf-py.
"""

from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path

import gguf

from adaptools.plugin import InputError

#: GGUF value type -> bytes per scalar (8 string, 9 array are variable).
SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9
#: The most dimensions a GGUF tensor has (ggml's GGML_MAX_DIMS).
MAX_DIMS = 4
#: Smallest tensor info: a name of length 0 (8), one dimension (4 + 8), a type (4) and an offset (8).
MIN_TENSOR_INFO = 32
#: Smallest key-value pair: a key of length 0 (8), a type (4) and a one-byte value.
MIN_KV = 13


MISLEAD = "the file is corrupt or was made to mislead"
TRUNCATED = "the file is truncated or corrupt; write or download it again"


def _unreadable(detail: str, path: Path, hint: str) -> InputError:
    """The one-line refusal, worded as :func:`.codec.open_reader` words gguf-py's own failures."""
    return InputError(f"not a readable GGUF file: {detail}", path=path, hint=hint)


class _Cursor:
    def __init__(self, data: mmap.mmap, path: Path):
        self.data, self.path, self.at = data, path, 0

    def left(self) -> int:
        return len(self.data) - self.at

    def take(self, fmt: str, what: str) -> int:
        size = struct.calcsize(fmt)
        if size > self.left():
            raise _unreadable(f"the header ends inside {what}", self.path, TRUNCATED)
        (value,) = struct.unpack_from(fmt, self.data, self.at)
        self.at += size
        return int(value)

    def count(self, fmt: str, what: str, unit: int) -> int:
        """A count whose items take at least ``unit`` bytes each, refused when they cannot fit."""
        n = self.take(fmt, what)
        if n * unit > self.left():
            raise _unreadable(f"the header declares {n} {what}, more than the {self.left()} bytes left can "
                             "hold", self.path, MISLEAD)
        return n

    def skip(self, n: int, what: str) -> None:
        if n > self.left():
            raise _unreadable(f"the header ends inside {what}", self.path, TRUNCATED)
        self.at += n

    def string(self, what: str) -> None:
        self.skip(self.count("<Q", f"bytes of {what}", 1), what)

    def text(self, what: str) -> str:
        n = self.count("<Q", f"bytes of {what}", 1)
        self.at += n
        return bytes(self.data[self.at - n:self.at]).decode("utf-8", "replace")


def check_counts(path: Path) -> None:
    """Refuse a GGUF file whose header declares more keys, array items, tensors, dimensions or string bytes
    than it holds. Files that are not GGUF (or not little-endian v2/v3) are left to gguf-py's own errors."""
    try:
        with open(path, "rb") as fh:
            if fh.read(4) != b"GGUF":
                return
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
                _walk(_Cursor(data, path))
    except (OSError, ValueError):  # an empty file cannot be mapped: gguf-py reports it
        return


def _walk(cur: _Cursor) -> None:
    cur.at = 4
    version = cur.take("<I", "the version")
    if version not in (2, 3):
        return  # big-endian or unknown: gguf-py says which
    n_tensors = cur.count("<Q", "tensors", MIN_TENSOR_INFO)
    n_kv = cur.count("<Q", "metadata keys", MIN_KV)
    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key = cur.text("a metadata key")
        kind = cur.take("<I", "a value type")
        if key == "general.alignment" and kind == 4:  # UINT32, as llama.cpp reads it
            alignment = cur.take("<I", "a metadata value") or alignment
        else:
            _value(cur, kind, nested=False)
    tensors = []
    for _ in range(n_tensors):
        name = cur.text("a tensor name")
        dims = cur.take("<I", "a tensor's dimension count")
        if not 1 <= dims <= MAX_DIMS:
            raise _unreadable(f"a tensor declares {dims} dimensions (GGUF has 1 to {MAX_DIMS})", cur.path, MISLEAD)
        shape = [cur.take("<Q", "a tensor's shape") for _ in range(dims)]
        tensors.append((name, shape, cur.take("<I", "a tensor's type"), cur.take("<Q", "a tensor's offset")))
    start = -(-cur.at // alignment) * alignment
    sizes = {int(k): v for k, v in gguf.GGML_QUANT_SIZES.items()}
    for name, shape, qtype, offset in tensors:  # each tensor's data inside the file (gguf-py's own message
        if qtype not in sizes or shape[0] % sizes[qtype][0]:  # names none)
            continue  # an unknown type, rows that are not whole blocks: gguf-py says which
        block, size = sizes[qtype]
        nbytes = math.prod(shape) // block * size
        if start + offset + nbytes > len(cur.data):
            raise InputError(f"not a readable GGUF file: the tensor's data ({gguf.GGMLQuantizationType(qtype).name}, "
                             f"{nbytes} bytes) ends {start + offset + nbytes - len(cur.data)} bytes past the end "
                             "of the file", path=cur.path, tensor=name, hint=TRUNCATED)


def _value(cur: _Cursor, kind: int, nested: bool) -> None:
    if kind in SCALAR_SIZES:
        cur.skip(SCALAR_SIZES[kind], "a metadata value")
    elif kind == STRING:
        cur.string("a metadata string")
    elif kind == ARRAY and not nested:
        item = cur.take("<I", "an array's item type")
        if item in SCALAR_SIZES:
            cur.skip(cur.count("<Q", "array items", SCALAR_SIZES[item]) * SCALAR_SIZES[item], "an array")
        elif item == STRING:
            for _ in range(cur.count("<Q", "array strings", 8)):
                cur.string("an array string")
        else:
            raise _unreadable(f"a metadata array of item type {item}, which GGUF does not define", cur.path, MISLEAD)
    else:
        raise _unreadable(f"a metadata value of type {kind}, which GGUF does not define"
                         + (" inside an array" if nested else ""), cur.path, MISLEAD)
