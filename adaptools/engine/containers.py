"""Where an engine run's output goes: the engine's own Hugging Face checkpoint folder, or a container a
backend offers (``merge ... --to NAME``, or an output path ending in that container's suffix).

The plan asks the chosen container which parameters it stores through a backend's group encoder and what
to warn about; the run asks it for one writer per shard and to finalize; ``--force`` asks every container
whether it wrote an existing output (``adaptools/outputs.py``). The folder container below is the default
and what every run wrote before containers existed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import registry
from ..checkpoint import Checkpoint
from ..errors import InputError
from ..interfaces import Backend, OutputContainer
from ..safetensors_io import written_by_adaptools
from .entries import MergePlan, ShardPlan
from .options import MergeOptions
from .writer import ShardWriter


class SafetensorsFolder(OutputContainer):
    """A Hugging Face checkpoint folder: safetensors shards (provenance in each header), the index,
    config.json, the base's other files and a model card."""

    name = "safetensors"
    description = "a Hugging Face checkpoint folder of safetensors shards (the default)"
    file_suffix = ".safetensors"
    directory = True

    def owns(self, path: Path) -> bool:
        """A safetensors file whose header metadata has an ``adaptools.`` key: a shard of a checkpoint adaptools
        wrote, or an adapter file (a schema file, a PEFT folder's weights)."""
        return written_by_adaptools(path)

    def prepare(self, checkpoint: Checkpoint, options: MergeOptions) -> Mapping[str, tuple[Backend, Mapping[str, Any]]]:
        if checkpoint.opened_by is not None:
            suffixes = [c.suffix or c.file_suffix for c in checkpoint.opened_by.containers()
                        if c.suffix or c.file_suffix]
            raise InputError("this base is a single file without config.json; it cannot become a checkpoint "
                             "folder", path=checkpoint.path,
                             hint=f"write the merge as one file: give OUT ending in {' or '.join(suffixes)}"
                             if suffixes else None)
        if options.outtype is not None:
            raise InputError(f"--outtype {options.outtype} applies to containers with storage types of their "
                             "own (--to); a checkpoint folder takes --dtype", hint="use --dtype fp32|fp16|bf16")
        if options.imatrix is not None:
            raise InputError("--imatrix applies to GGUF outputs only (llama.cpp's block quants)",
                             hint="write OUT as a .gguf file from a GGUF base, or drop --imatrix")
        return {}

    def writer(self, path: Path, shard: ShardPlan, plan: MergePlan, record: Mapping[str, Any]) -> ShardWriter:
        metadata = {"format": "pt", "adaptools.provenance": json.dumps(record, sort_keys=True)}
        return ShardWriter(path, shard, lambda n: plan.checkpoint.location[n][1], metadata)

    def finalize(self, path: Path, plan: MergePlan, record: Mapping[str, Any]) -> None:
        from .finalize import write_files, write_index

        write_index(path, plan)
        write_files(path, plan, record)


FOLDER = SafetensorsFolder()


def containers() -> dict[str, OutputContainer]:
    """Every output container by name: the folder, then those the installed backends offer."""
    found: dict[str, OutputContainer] = {FOLDER.name: FOLDER}
    for entry in registry.backends().values():
        for container in entry.obj.containers():
            found.setdefault(container.name, container)
    return found


def choose(options: MergeOptions, out: str | os.PathLike[str] | None,
           checkpoint: Checkpoint | None = None) -> OutputContainer:
    """``--to NAME``; else, for a base a backend opened from one file, that backend's container whose
    ``suffix`` or ``file_suffix`` ``out`` ends in; else any container whose suffix ``out`` ends in; else the
    folder."""
    found = containers()
    if options.to is not None:
        if options.to not in found:
            raise InputError(f"unknown output container {options.to!r}", hint=f"use one of {', '.join(found)}")
        return found[options.to]
    if out is not None:
        name = os.fspath(out).lower()
        opened_by: Backend | None = checkpoint.opened_by if checkpoint is not None else None
        own: Sequence[OutputContainer] = opened_by.containers() if opened_by is not None else ()
        for container in own:
            if any(s and name.endswith(s.lower()) for s in (container.suffix, container.file_suffix)):
                return container
        for container in found.values():
            if container.suffix and name.endswith(container.suffix.lower()):
                return container
    return FOLDER
