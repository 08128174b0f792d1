"""Stage 3 of the engine: the one writer of output shards, dense or quantized.

When every tensor's size is known from the plan, the header is written first and the bytes stream
behind it from a background thread, so computing the next tensor overlaps writing the last. When some
sizes are known only after encoding (a quantized group's JSON state), the bytes go to a side file and
the header is written at the end. Either way untouched tensors are copied by the kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..safetensors_io import DeferredSafetensorsWriter, SafetensorsWriter, TensorInfo, TensorSpec
from .entries import ShardPlan


class ShardWriter:
    """Writes one planned shard: ``copy`` for stored tensors kept unchanged, ``write`` for computed ones,
    in the plan's slot order."""

    def __init__(self, path: Path, shard: ShardPlan, raw_info: Callable[[str], TensorInfo],
                 metadata: Mapping[str, str]):
        self.path = path
        self._writer: SafetensorsWriter | DeferredSafetensorsWriter
        if shard.deferred:
            self._writer = DeferredSafetensorsWriter(path, metadata)
        else:
            specs: dict[str, TensorSpec] = {}
            for slot in shard.slots:
                if slot.raw is not None:
                    info = raw_info(slot.raw)
                    specs[slot.raw] = TensorSpec(info.dtype, info.shape)
                else:
                    specs[slot.entry.name] = slot.entry.spec  # type: ignore[assignment]
            self._writer = SafetensorsWriter(path, specs, metadata, background=True)

    def copy(self, name: str, src: BinaryIO, info: TensorInfo) -> None:
        """The next tensor, copied from ``src`` unchanged (``src`` stays open until the writer closes)."""
        if isinstance(self._writer, DeferredSafetensorsWriter):
            self._writer.copy_range(name, src, info.begin, info.nbytes, TensorSpec(info.dtype, info.shape))
        else:
            self._writer.copy_range(name, src, info.begin, info.nbytes)

    def write(self, name: str, tensor: torch.Tensor, done: Callable[[], None] | None = None) -> None:
        self._writer.write(name, tensor, done)

    @property
    def seconds(self) -> float:
        """Time spent writing bytes (in a background thread for header-first shards)."""
        return self._writer.seconds

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._writer.__exit__(*exc)
