"""safetensors in and out, one tensor at a time.

Reading: :func:`read_header` parses and *validates* a file's header before anything trusts it (a truncated
download or a header whose offsets lie must give a clear error naming the file and tensor, not a
segfault or a silent short read). :class:`SafetensorsFile` then reads single tensors lazily through
safetensors' memory map.

Writing lives in :mod:`adaptools.safetensors_write` (re-exported here).
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import safe_open

from .errors import InputError
from .float_types import DTYPES, TORCH_TO_CODE
from .jsonio import parse_json, short

#: A header larger than this is refused: real headers are a few MB at most, and a lying length
#: field would otherwise make us allocate whatever it claims.
MAX_HEADER_BYTES = 100 * 1024 * 1024
#: Longest tensor name, and most dimensions, a header may give (real ones: ~100 characters, 5 dims).
MAX_TENSOR_NAME = 1024
MAX_DIMS = 16
#: Floating-point codes every torch operation supports; F8 values decode only through a cast to fp32.
FULL_FLOATS = ("F64", "F32", "F16", "BF16")


def _is_size(value: object) -> bool:
    """A shape entry or offset: a JSON integer (``true`` is an int in Python, and is refused), 0..2^63-1."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file, and what it is."""

    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]


@dataclass(frozen=True)
class Header:
    """A validated safetensors header: tensors in file order, and the string metadata."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int


def _open_regular(path: Path) -> BinaryIO:
    """Open a regular file for reading without blocking on a FIFO or reading a device without end."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        kind = "a directory" if path.is_dir() else "not a regular file (a FIFO, device or socket)"
        raise InputError(f"{kind}, not a safetensors file", path=path, hint="give a regular file")
    return os.fdopen(fd, "rb")


def written_by_adaptools(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a safetensors file whose header metadata has an ``adaptools.`` key (a checkpoint
    shard, a single file or an adapter adaptools wrote): what ``--force`` asks before replacing a file
    (docs/outputs.md). Reads only the header, and never raises (an unreadable file is not ours)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return False
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES:
                return False
            return b'"__metadata__"' in (raw := fh.read(length)) and b'"adaptools.' in raw
    except OSError:
        return False


def read_header(path: str | os.PathLike[str]) -> Header:
    """Read and validate the header of a safetensors file without reading any tensor data.

    Raises:
        InputError: naming the file (and the tensor) when the file is truncated, its header is not JSON,
            or its offsets, shapes and dtypes disagree.
    """
    path = Path(path)
    try:
        with _open_regular(path) as fh:
            size = os.fstat(fh.fileno()).st_size
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise InputError("not a safetensors file: shorter than its 8-byte header length", path=path,
                                 hint="the file is truncated; download or copy it again")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise InputError(f"header length field says {header_len} bytes but the file has {size}",
                                 path=path, hint="the file is truncated or not safetensors")
            raw = fh.read(header_len)
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", path=path) from None
    if raw.startswith(b"\xef\xbb\xbf"):  # json.loads would take it; safetensors itself, and so transformers, refuse it
        raise InputError("the safetensors header starts with a byte-order mark, which safetensors refuses", path=path,
                         hint="the file was edited as text or made by a broken writer: save it again with safetensors")
    header = parse_json(raw, path=path, what="safetensors header", max_depth=4,
                        hint="the file is corrupt or not safetensors")
    if not isinstance(header, dict):
        raise InputError("header is not a JSON object", path=path)
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError("__metadata__ must map strings to strings", path=path)
    data_start = 8 + header_len
    data_len = size - data_start
    entries = []
    for name, entry in header.items():
        if not name or len(name) > MAX_TENSOR_NAME or not name.isprintable():
            raise InputError("tensor name is empty, longer than 1024 characters, or holds control characters",
                             path=path, tensor=name, hint="the file is corrupt or was made to mislead")
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise InputError("header entry lacks dtype, shape or data_offsets", path=path, tensor=name)
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise InputError(f"unsupported dtype {short(dtype)}", path=path, tensor=name,
                             hint=f"adaptools reads {', '.join(DTYPES)}")
        if (not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_size(d) for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_size(o) for o in offsets)):
            raise InputError(f"malformed shape {short(shape)} or data_offsets {short(offsets)} (lists of "
                             "non-negative integers)", path=path, tensor=name, hint="the file is corrupt")
        begin, end = offsets
        numel = 1
        for d in shape:
            numel *= d
        if end < begin or end - begin != numel * DTYPES[dtype][1]:
            raise InputError(f"data_offsets {offsets} do not hold a {dtype} tensor of shape {shape}",
                             path=path, tensor=name, hint="the header lies; the file is corrupt")
        if end > data_len:
            raise InputError(f"data_offsets {offsets} run past the end of the data ({data_len} bytes)",
                             path=path, tensor=name, hint="the file is truncated; download or copy it again")
        entries.append((begin, end, name, dtype, tuple(shape)))
    entries.sort()
    cursor = 0
    for begin, end, name, _, _ in entries:
        if begin != cursor:
            raise InputError(f"data_offsets start at {begin}, expected {cursor} (overlap or gap)",
                             path=path, tensor=name, hint="the header lies; the file is corrupt")
        cursor = end
    if cursor != data_len:
        raise InputError(f"tensors cover {cursor} bytes but the data section has {data_len}", path=path,
                         hint="the file is truncated or has trailing garbage")
    tensors = {
        name: TensorInfo(dtype, shape, data_start + begin, data_start + end)
        for begin, end, name, dtype, shape in entries
    }
    return Header(tensors=tensors, metadata=dict(metadata), data_start=data_start)


class SafetensorsFile:
    """A validated safetensors file whose tensors are read one at a time, on demand (memory-mapped)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.header = read_header(self.path)
        self._handle: Any = None

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.metadata

    def keys(self) -> list[str]:
        return list(self.header.tensors)

    def info(self, name: str) -> TensorInfo:
        return self.header.tensors[name]

    def get(self, name: str) -> torch.Tensor:
        """Return one tensor (a fresh CPU tensor; the file stays memory-mapped, not read whole)."""
        if self._handle is None:
            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
        tensor: torch.Tensor = self._handle.get_tensor(name)
        return tensor

    def read_bytes(self, name: str, fh: BinaryIO | None = None) -> bytes:
        """The raw stored bytes of one tensor, for byte-for-byte copies that never decode."""
        info = self.header.tensors[name]
        if fh is not None:
            fh.seek(info.begin)
            return fh.read(info.nbytes)
        with open(self.path, "rb") as own:
            own.seek(info.begin)
            return own.read(info.nbytes)


def read_tensor(src: BinaryIO, info: TensorInfo, into: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor's bytes with a plain read (no memory map, so RSS stays one tensor).

    The buffer (``into``, a uint8 tensor of exactly ``info.nbytes``, or a fresh one) is filled by
    ``preadv``: one pass over the bytes, not two.
    """
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.torch_dtype)
    buf = into if into is not None else torch.empty(info.nbytes, dtype=torch.uint8)
    view = buf.numpy().data
    got = 0
    while got < info.nbytes:
        n = os.preadv(src.fileno(), [view[got:]], info.begin + got)
        if not n:
            raise InputError("file ended inside a tensor", path=getattr(src, "name", None))
        got += n
    return buf.view(info.torch_dtype).reshape(info.shape)


from .safetensors_write import (  # noqa: E402  (re-exported: readers and writers are used together)
    DeferredSafetensorsWriter,
    SafetensorsWriter,
    TensorSpec,
    save_tensors,
    tensor_bytes,
)

__all__ = ["DTYPES", "FULL_FLOATS", "MAX_HEADER_BYTES", "TORCH_TO_CODE", "DeferredSafetensorsWriter", "Header",
           "SafetensorsFile", "SafetensorsWriter", "TensorInfo", "TensorSpec", "read_header", "read_tensor",
           "save_tensors", "tensor_bytes", "written_by_adaptools"]
