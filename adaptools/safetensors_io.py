"""safetensors in and out, one tensor at a time.

Reading: :func:`read_header` parses and *validates* a file's header before anything trusts it (a truncated
download or a header whose offsets lie must give a clear error naming the file and tensor, not a
segfault or a silent short read). :class:`SafetensorsFile` then reads single tensors lazily through
safetensors' memory map.

Writing: :class:`SafetensorsWriter` writes the header first and then each tensor's bytes in order, so a
checkpoint of any size is written with one tensor in memory at a time.
"""

from __future__ import annotations

import json
import os
import queue
import stat
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import safe_open

from .errors import InputError
from .jsonio import parse_json, short

#: safetensors dtype code -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
for _code, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_code] = (getattr(torch, _attr), torch.empty((), dtype=getattr(torch, _attr)).element_size())
TORCH_TO_CODE = {torch_dtype: code for code, (torch_dtype, _) in DTYPES.items()}

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


@dataclass(frozen=True)
class TensorSpec:
    """What the writer needs to lay out a tensor before its bytes exist."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * DTYPES[self.dtype][1]

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorSpec:
        return cls(TORCH_TO_CODE[tensor.dtype], tuple(tensor.shape))


def tensor_bytes(tensor: torch.Tensor) -> bytes | memoryview:
    """The little-endian bytes of a tensor, as safetensors stores them."""
    tensor = tensor.detach().contiguous().cpu()
    if tensor.numel() == 0:
        return b""
    return tensor.reshape(-1).view(torch.uint8).numpy().data


class SafetensorsWriter:
    """Writes a safetensors file header-first, then tensor bytes in the declared order.

    Memory use is one tensor at a time: the header is computed from ``specs`` up front, so nothing has to
    be buffered. Every declared tensor must be written exactly once, in order; closing early is an error,
    which keeps a half-written file from ever looking complete.

    With ``background=True`` the bytes are written by a helper thread (at most ``depth`` tensors queued),
    so the caller computes the next tensor while the kernel copies the last one into the page cache.

    Example:
        with SafetensorsWriter(path, {"w": TensorSpec("F32", (2, 2))}, {"format": "pt"}) as out:
            out.write("w", torch.zeros(2, 2))
    """

    def __init__(self, path: str | os.PathLike[str], specs: Mapping[str, TensorSpec],
                 metadata: Mapping[str, str] | None = None, *, background: bool = False, depth: int = 2):
        self.path = Path(path)
        self._order = list(specs)
        self._specs = dict(specs)
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        offset = 0
        for name in self._order:
            spec = self._specs[name]
            header[name] = {"dtype": spec.dtype, "shape": list(spec.shape),
                            "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned, as safetensors does
        self._fh: BinaryIO = open(self.path, "wb")
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)
        self._next = 0
        self.seconds = 0.0  # spent writing (in the background thread when there is one)
        self._queue: queue.Queue[Callable[[], None] | None] | None = None
        self._error: BaseException | None = None
        if background:
            self._queue = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._drain, name="adaptools-writer", daemon=True)
            self._thread.start()

    def _drain(self) -> None:
        assert self._queue is not None
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._error is None:
                started = time.perf_counter()
                try:
                    job()
                except BaseException as exc:  # re-raised in the caller's thread
                    self._error = exc
                self.seconds += time.perf_counter() - started

    def _submit(self, job: Callable[[], None]) -> None:
        if self._error is not None:
            raise self._error
        if self._queue is None:
            started = time.perf_counter()
            job()
            self.seconds += time.perf_counter() - started
        else:
            self._queue.put(job)

    def _expect(self, name: str, nbytes: int) -> None:
        if self._next >= len(self._order) or self._order[self._next] != name:
            expected = self._order[self._next] if self._next < len(self._order) else "nothing"
            raise ValueError(f"tensors must be written in declared order: got {name!r}, expected {expected!r}")
        if nbytes != self._specs[name].nbytes:
            raise ValueError(f"{name!r}: {nbytes} bytes given, {self._specs[name].nbytes} declared")
        self._next += 1

    def write(self, name: str, tensor: torch.Tensor, done: Callable[[], None] | None = None) -> None:
        """Write the next tensor; its dtype and shape must be the declared ones. ``done`` is called once its
        bytes are written (from the writer thread with ``background=True``), e.g. to reuse its buffer."""
        spec = TensorSpec.of(tensor)
        if spec != self._specs.get(name):
            raise ValueError(f"{name!r}: got {spec}, declared {self._specs.get(name)}")
        data = tensor_bytes(tensor)  # keeps ``tensor`` alive until written
        self._expect(name, len(data))

        def job() -> None:
            self._fh.write(data)
            if done is not None:
                done()

        self._submit(job)

    def write_raw(self, name: str, data: bytes | memoryview) -> None:
        """Write the next tensor's stored bytes unchanged (byte-for-byte copy)."""
        self._expect(name, len(data))

        def job() -> None:
            self._fh.write(data)

        self._submit(job)

    def copy_range(self, name: str, src: BinaryIO, offset: int, nbytes: int) -> None:
        """Write the next tensor by copying ``nbytes`` at ``offset`` of ``src`` (kernel-side when possible).

        Uses ``os.copy_file_range`` so untouched tensors never pass through Python memory; falls back to
        bounded chunked reads where the kernel or filesystem cannot. ``src`` must stay open until close().
        """
        self._expect(name, nbytes)
        self._submit(lambda: self._copy(name, src, offset, nbytes))

    def _copy(self, name: str, src: BinaryIO, offset: int, nbytes: int) -> None:
        self._fh.flush()
        done = 0
        copy = getattr(os, "copy_file_range", None)
        if copy is not None:
            try:
                while done < nbytes:
                    n = copy(src.fileno(), self._fh.fileno(), nbytes - done, offset + done)
                    if n == 0:
                        break
                    done += n
            except OSError:
                pass
            self._fh.seek(0, os.SEEK_END)
        chunk = 64 * 1024 * 1024
        while done < nbytes:
            data = os.pread(src.fileno(), min(chunk, nbytes - done), offset + done)
            if not data:
                raise ValueError(f"{name!r}: source ended early")
            self._fh.write(data)
            done += len(data)

    def _finish(self) -> None:
        if self._queue is not None:
            self._queue.put(None)
            self._thread.join()
            self._queue = None

    def close(self) -> None:
        self._finish()
        complete = self._next == len(self._order)
        self._fh.close()
        if self._error is not None:
            raise self._error
        if not complete:
            raise ValueError(f"{self.path}: closed after {self._next} of {len(self._order)} tensors")

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self._error = self._error or RuntimeError("aborted")
            self._finish()
            self._fh.close()
            return
        self.close()


class DeferredSafetensorsWriter:
    """Writes a safetensors file whose tensor sizes are only known as they are produced.

    Tensor bytes go to a hidden data file next to ``path`` in the order written; ``close()`` writes the
    header and then moves the data behind it with ``copy_file_range``. Used where a tensor's size depends on
    its content (a 4-bit state's JSON blob). Memory stays one tensor; disk use is briefly twice the file.
    """

    def __init__(self, path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self._metadata = dict(metadata or {})
        self._data_path = self.path.with_name(f".{self.path.name}.data")
        self._fh: BinaryIO = open(self._data_path, "wb+")
        self._specs: dict[str, TensorSpec] = {}
        self.seconds = 0.0

    def write(self, name: str, tensor: torch.Tensor, done: Callable[[], None] | None = None) -> None:
        if name in self._specs:
            raise ValueError(f"{name!r} written twice")
        self._specs[name] = TensorSpec.of(tensor)
        started = time.perf_counter()
        self._fh.write(tensor_bytes(tensor))
        self.seconds += time.perf_counter() - started
        if done is not None:
            done()

    def copy_range(self, name: str, src: BinaryIO, offset: int, nbytes: int, spec: TensorSpec) -> None:
        """Append a stored tensor's bytes unchanged."""
        self._specs[name] = spec
        self._fh.flush()
        done = 0
        while done < nbytes:
            data = os.pread(src.fileno(), min(64 << 20, nbytes - done), offset + done)
            if not data:
                raise ValueError(f"{name!r}: source ended early")
            self._fh.write(data)
            done += len(data)

    def close(self) -> None:
        started = time.perf_counter()
        self._fh.flush()
        size = self._fh.tell()
        with SafetensorsWriter(self.path, self._specs, self._metadata) as out:
            for name, spec in self._specs.items():
                out._expect(name, spec.nbytes)
            out._fh.flush()
            done = 0
            while done < size:
                data = os.pread(self._fh.fileno(), min(64 << 20, size - done), done)
                out._fh.write(data)
                done += len(data)
        self._fh.close()
        self._data_path.unlink()
        self.seconds += time.perf_counter() - started

    def __enter__(self) -> DeferredSafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self._fh.close()
            self._data_path.unlink(missing_ok=True)
            return
        self.close()


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


def save_tensors(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> None:
    """Write a small dict of tensors (an adapter) in one go, in the given key order."""
    specs = {name: TensorSpec.of(t) for name, t in tensors.items()}
    with SafetensorsWriter(path, specs, metadata) as out:
        for name, tensor in tensors.items():
            out.write(name, tensor)
