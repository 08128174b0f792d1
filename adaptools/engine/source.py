"""Reading the base during a merge: open handles kept for the whole run, and reusable buffers.

A fresh buffer for every tensor costs a page fault per 4 KiB the first time it is touched, in the read
and again in the write; on a 2.2 GB checkpoint that was more system time than the arithmetic
(docs/merge-engine.md, "Where the time goes"). Buffers are therefore taken from a small pool and given
back once the tensor has been written.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from ..checkpoint import Checkpoint
from ..safetensors_io import DTYPES, TensorInfo, read_tensor

#: Free buffers kept for reuse; more would only hold memory the next tensors will not need.
KEEP_FREE = 4
#: Buffers are sized in steps of this many bytes, so tensors of similar size share them.
GRANULE = 1 << 20


class BufferPool:
    """Reusable byte buffers. ``take`` returns a uint8 tensor of exactly the size asked for, viewing the
    start of a pooled buffer; ``give`` returns it (from any thread)."""

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []
        self._lent: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            fitting = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            if fitting:  # (by index: ``list.remove`` would compare tensors element by element)
                buffer = self._free.pop(min(fitting, key=lambda i: self._free[i].numel()))
            else:
                # numpy's allocator advises transparent huge pages for large arrays, so a new buffer faults
                # in 2 MiB at a time where torch.empty's does 4 KiB (docs/merge-engine.md, "Where the time goes")
                buffer = torch.from_numpy(np.empty(max(GRANULE, -(-nbytes // GRANULE) * GRANULE), dtype=np.uint8))
            view = buffer[:nbytes]
            self._lent[view.data_ptr()] = buffer
            return view

    def give(self, view: torch.Tensor) -> None:
        with self._lock:
            buffer = self._lent.pop(view.data_ptr(), None)
            if buffer is None:
                return
            self._free.append(buffer)
            if len(self._free) > KEEP_FREE:
                self._free.pop(min(range(len(self._free)), key=lambda i: self._free[i].numel()))

    def tensor(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """An uninitialised tensor of ``dtype`` and ``shape`` on a pooled buffer (give it back when done)."""
        numel = 1
        for d in shape:
            numel *= d
        size = torch.empty((), dtype=dtype).element_size()
        return self.take(numel * size).view(dtype).reshape(shape)

    def give_tensor(self, tensor: torch.Tensor) -> None:
        self.give(tensor)


class Reader:
    """The base's stored tensors, read with a plain read into pooled buffers; handles stay open until
    :meth:`close` (the writer may still be copying from them in the background)."""

    def __init__(self, checkpoint: Checkpoint, pool: BufferPool):
        self.checkpoint = checkpoint
        self.pool = pool
        self._handles: dict[Path, BinaryIO] = {}
        self._kept: dict[str, dict[str, torch.Tensor]] = {}  # a group's stored tensors, by parameter
        self.seconds = 0.0  # spent reading and decoding groups, for the profile

    def handle(self, path: Path) -> BinaryIO:
        fh = self._handles.get(path)
        if fh is None:
            fh = self._handles[path] = open(path, "rb")
        return fh

    def raw(self, name: str) -> tuple[BinaryIO, TensorInfo]:
        """Where a stored tensor's bytes are, for a copy that never decodes them."""
        shard, info = self.checkpoint.location[name]
        return self.handle(shard.path), info

    def read(self, name: str) -> tuple[torch.Tensor, bool]:
        """A parameter's stored value (a quantized group decoded to its dense dtype), and whether it lives
        on a pooled buffer (then :meth:`release` it)."""
        started = time.perf_counter()
        try:
            if name in self.checkpoint.groups:  # decoded into a pooled buffer where the backend can
                logical = self.checkpoint.tensor(name)
                lent = self.pool.tensor(DTYPES[logical.dtype][0], tuple(logical.shape))
                kept: dict[str, torch.Tensor] = {}
                try:
                    value = self.checkpoint.read_group(name, kept, lent)
                except BaseException:
                    self.pool.give(lent)
                    raise
                self._kept[name] = kept
                if value.data_ptr() == lent.data_ptr() and value.numel() == lent.numel():
                    return value, True
                self.pool.give(lent)
                return value, False
            fh, info = self.raw(name)
            return read_tensor(fh, info, into=self.pool.take(info.nbytes)), True
        finally:
            self.seconds += time.perf_counter() - started

    def stored_parts(self, name: str) -> dict[str, torch.Tensor]:
        """The stored tensors the group ``name`` was last decoded from by :meth:`read` (empty for a plain tensor),
        handed over once: re-encoding compares its bytes with them (the survival report's changed share), and
        reading them again cost as much as the encoding itself (docs/merge-engine.md, "Where the time goes")."""
        return self._kept.pop(name, {})

    def release(self, tensor: torch.Tensor, pooled: bool) -> None:
        if pooled:
            self.pool.give(tensor)

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()
        self._kept.clear()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Prefetch:
    """Reads the sources of the entries to compute ahead of the computation, in a thread of its own, so
    that reading (and decoding quantized groups) overlaps the arithmetic and the writing. At most
    ``depth`` values wait in memory."""

    _END = object()

    def __init__(self, reader: Reader, names: list[str], depth: int = 2):
        self.reader = reader
        self._names = names
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="adaptools-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for name in self._names:
            if self._stop.is_set():
                return
            try:
                item: Any = (name, *self.reader.read(name))
            except BaseException as exc:  # handed to the consumer, raised in its thread
                item = (name, exc, False)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item[1], BaseException):
                return

    def get(self, name: str) -> tuple[torch.Tensor, bool]:
        """The next source, which must be ``name`` (entries are computed in plan order)."""
        got, value, pooled = self._queue.get()
        if isinstance(value, BaseException):
            raise value
        if got != name:  # pragma: no cover - a bug in the caller's order
            raise RuntimeError(f"prefetch order: expected {name}, read {got}")
        return value, pooled

    def close(self) -> None:
        self._stop.set()
        while True:  # give back what was read ahead and never used
            try:
                _, value, pooled = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(value, torch.Tensor):
                self.reader.release(value, pooled)
        self._thread.join()
