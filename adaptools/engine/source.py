"""Reading the base during a merge: open handles kept for the whole run, and reusable buffers.

A fresh buffer for every tensor costs a page fault per 4 KiB the first time it is touched, in the read
and again in the write; on a 2.2 GB checkpoint that was more system time than the arithmetic
(docs/merge-engine.md, "Where the time goes"). Buffers are therefore taken from a small pool and given
back once the tensor has been written.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..checkpoint import Checkpoint
from ..safetensors_io import TensorInfo, read_tensor

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
                buffer = torch.empty(max(GRANULE, -(-nbytes // GRANULE) * GRANULE), dtype=torch.uint8)
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
            if name in self.checkpoint.groups:
                return self.checkpoint.read(name), False
            fh, info = self.raw(name)
            return read_tensor(fh, info, into=self.pool.take(info.nbytes)), True
        finally:
            self.seconds += time.perf_counter() - started

    def release(self, tensor: torch.Tensor, pooled: bool) -> None:
        if pooled:
            self.pool.give(tensor)

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
