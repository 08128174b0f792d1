"""One Stable Diffusion single-file ``.safetensors`` as a merge's output, from a single-file base (single_file.py
opens it, single_file_layout.py says what it holds): every stored tensor under its stored name, in the base's
order, dtype and shape, the base's header metadata kept and adaptools' provenance added (so that ``--force``
knows the file as ours).

The engine hands the writer one piece at a time: a whole tensor (copied byte for byte when untouched, else
written in its stored dtype), or one of the q, k, v row blocks of a fused OpenCLIP in-projection, which are
gathered (one in-projection's bytes at most) and written as their one stored tensor (docs/diffusion.md,
"Single-file checkpoints").
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from adaptools import plugin
from adaptools.plugin import InputError, TensorInfo, TensorSpec, UnsupportedOperationError

from .flux_single_file import swap_updates
from .single_file_layout import SingleFile

PROVENANCE = "adaptools.provenance"


def opened_file(checkpoint: plugin.Checkpoint) -> SingleFile:
    """The single file the base was opened from; any other base is refused."""
    base = getattr(checkpoint.opened_by, "base", None)
    if not isinstance(base, SingleFile):
        raise InputError("a Stable Diffusion single-file output is written from a single-file base only",
                         path=checkpoint.path, hint="merge a pipeline folder into a folder (OUT without a suffix)")
    return base


class SingleFileContainer(plugin.OutputContainer):
    name = "sd-single-file"
    description = "one SD 1.x/SDXL or FLUX.1 .safetensors in the original key naming (from such a base)"
    suffix = None  # chosen for a single-file base's .safetensors OUT, never for other bases
    file_suffix = ".safetensors"
    directory = False

    def owns(self, path: Path) -> bool:
        """A safetensors file adaptools wrote (its header metadata has adaptools' keys)."""
        return plugin.written_by_adaptools(path)

    def prepare(self, checkpoint: plugin.Checkpoint,
                options: plugin.MergeOptions) -> Mapping[str, tuple[plugin.Backend, Mapping[str, Any]]]:
        opened_file(checkpoint)
        refused = [("--dtype", options.dtype != "auto"), ("--outtype", options.outtype is not None),
                   ("--quantize", options.quantize is not None), ("--requantize", options.requantize),
                   ("--imatrix", options.imatrix is not None)]
        for flag, given in refused:
            if given:
                raise InputError(f"{flag} does not apply to a single-file checkpoint: every tensor keeps its stored "
                                 "dtype", path=checkpoint.path, hint=f"merge without {flag}")
        return {}

    def warnings(self, plan: plugin.MergePlan) -> list[str]:
        """Refuse what the file cannot hold: a tensor it does not store, or one of another shape or dtype. A
        tensor stored with its row halves exchanged (Flux's final modulation) gets its updates through the
        exchange, here, the one place that sees both the plan and the file, before anything is computed; no
        other container writes a single-file base (a folder output refuses it), so none can skip this."""
        opened = opened_file(plan.checkpoint)
        for entry in plan.entries.values():
            if entry.name in opened.swapped and entry.chain:
                entry.chain = swap_updates(entry.chain)
            info = opened.tensors.get(entry.name)
            if info is None or tuple(entry.shape) != tuple(info.shape) or entry.dtype != info.dtype:
                raise UnsupportedOperationError(
                    f"the merge would write {entry.name} as {entry.dtype} {list(entry.shape)}, which the "
                    "single file does not store so", path=plan.checkpoint.path, tensor=entry.name,
                    hint="a single-file checkpoint keeps every tensor's name, shape and dtype")
        return []

    def writer(self, path: Path, shard: plugin.ShardPlan, plan: plugin.MergePlan,
               record: Mapping[str, Any]) -> SingleFileWriter:
        return SingleFileWriter(path, opened_file(plan.checkpoint), record)


def _pread(src: BinaryIO, info: TensorInfo) -> bytes:
    parts, done = [], 0
    while done < info.nbytes:
        data = os.pread(src.fileno(), info.nbytes - done, info.begin + done)
        if not data:
            raise InputError("the file ended inside this tensor", tensor=None, hint="the base changed while read")
        parts.append(data)
        done += len(data)
    return b"".join(parts)


class SingleFileWriter:
    """Writes the output file header-first (every tensor's size is the base's), pieces in the plan's order."""

    def __init__(self, path: Path, opened: SingleFile, record: Mapping[str, Any]):
        self.opened = opened
        metadata = {**opened.metadata, PROVENANCE: json.dumps(record, sort_keys=True)}
        order = sorted(opened.stored, key=lambda k: opened.stored[k].begin)
        specs = {k: TensorSpec(opened.stored[k].dtype, tuple(opened.stored[k].shape)) for k in order}
        self._out = plugin.SafetensorsWriter(path, specs, metadata, background=True)
        self._gathered: dict[str, list[bytes]] = {}

    @property
    def seconds(self) -> float:
        return float(self._out.seconds)

    def copy(self, name: str, src: BinaryIO, info: TensorInfo) -> None:
        key, part = self.opened.pieces[name]
        if part is None:
            self._out.copy_range(key, src, info.begin, info.nbytes)
        else:
            self._gather(key, part, _pread(src, info))

    def write(self, name: str, tensor: torch.Tensor, done: Callable[[], None] | None = None) -> None:
        key, part = self.opened.pieces[name]
        if part is None:
            self._out.write(key, tensor, done)
            return
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
        if done is not None:
            done()
        self._gather(key, part, data)

    def _gather(self, key: str, part: int, data: bytes) -> None:
        """Row block ``part`` of ``key``; the tensor is written once all its blocks are here, in order."""
        parts = self._gathered.setdefault(key, [])
        if len(parts) != part:
            raise UnsupportedOperationError(f"row block {part} of {key} came out of order", tensor=key,
                                            hint="report this: the plan must keep the base's order")
        parts.append(data)
        if len(parts) == self.opened.blocks.get(key, 3):
            self._out.write_raw(key, b"".join(self._gathered.pop(key)))

    def __enter__(self) -> SingleFileWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._out.__exit__(*exc)
