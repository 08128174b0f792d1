"""A base made of several checkpoints: a pipeline folder (``model_index.json`` beside one checkpoint folder per
component, as diffusers saves a pipeline). Adapter module paths start with the component they change
(``unet.down_blocks.0…``, ``text_encoder.…``); each adapted component is merged by the ordinary engine into
the same folder name of the output, and everything else (other components, scheduler, tokenizers,
``model_index.json``) is copied unchanged, so the output loads as the base did (docs/merge-engine.md,
"Pipeline folders").

Nothing here knows a method or a format: an adapter is split by the first segment of its tensor names, and
a component's base tensors are found as for any checkpoint (``BaseInfo.locate`` drops that first segment).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import IncompatibleBaseError, InputError
from ..outputs import atomic_output
from ..resolve import resolve
from ..schema import Adapter, StoredTensorInfo
from .options import MergeEvent, MergeInput, MergeOptions, MergeSummary

#: The file that marks a pipeline folder.
MARKER = "model_index.json"
#: Tensor names listed in an error about tensors that name no component.
SHOWN = 5


def is_pipeline(path: str | os.PathLike[str]) -> bool:
    """A local folder holding ``model_index.json`` and no ``config.json`` of its own."""
    p = Path(path)
    return p.is_dir() and (p / MARKER).is_file() and not (p / "config.json").exists()


class _Subset:
    """The tensors of one component, as a ``TensorStore`` (names unchanged, read from the full store)."""

    def __init__(self, store: object, names: list[str]):
        self.store, self._names = store, names

    def names(self) -> list[str]:
        return list(self._names)

    def info(self, name: str) -> StoredTensorInfo:
        return self.store.info(name)  # type: ignore[attr-defined, no-any-return]

    def get(self, name: str) -> torch.Tensor:
        return self.store.get(name)  # type: ignore[attr-defined, no-any-return]

    def origin(self, name: str) -> tuple[str, str]:
        return self.store.origin(name)  # type: ignore[attr-defined, no-any-return]


def components_of(base: Path) -> list[str]:
    """The component folders of a pipeline that are checkpoints (hold a config.json)."""
    return sorted(p.name for p in base.iterdir() if p.is_dir() and (p / "config.json").is_file())


def same_components(a: Path, b: Path) -> list[str]:
    """The component folders two pipelines share, which must be all of each's (``extract`` compares them
    one component at a time); pipelines of different make-up are an error naming what differs."""
    mine, theirs = components_of(a), components_of(b)
    if mine != theirs:
        differ = sorted(set(mine) ^ set(theirs))
        raise IncompatibleBaseError(f"the pipelines hold different components ({', '.join(differ)} "
                                    "in only one)", path=b, hint="compare two pipelines of one model family")
    if not mine:
        raise InputError("the pipeline folder holds no component checkpoint (a folder with config.json)", path=a)
    return mine


def split_inputs(base: Path, inputs: Sequence[MergeInput]) -> dict[str, list[MergeInput]]:
    """component -> the inputs restricted to it. A tensor whose first path segment names no component of
    the pipeline is an error naming it (it would change nothing)."""
    components = set(components_of(base))
    per: dict[str, list[MergeInput]] = {}
    for item in inputs:
        by_component: dict[str, list[str]] = {}
        for name in item.adapter.tensor_names():
            by_component.setdefault(name.split(".", 1)[0], []).append(name)
        unmatched = sorted(n for c, names in by_component.items() if c not in components for n in names)
        if unmatched:
            more = f" (and {len(unmatched) - SHOWN} more)" if len(unmatched) > SHOWN else ""
            raise IncompatibleBaseError(
                f"{len(unmatched)} adapter tensor(s) name no component of this pipeline: "
                f"{', '.join(unmatched[:SHOWN])}{more}", path=item.adapter.source,
                hint=f"the pipeline's components are {', '.join(sorted(components))}; the adapter was made for "
                     "another pipeline")
        for component, names in by_component.items():
            subset = Adapter(item.adapter.method, item.adapter.config, _Subset(item.adapter.tensors, names),
                             item.adapter.base, item.adapter.provenance, item.adapter.source,
                             item.adapter.schema_version, item.adapter.read_format)
            per.setdefault(component, []).append(replace(item, adapter=subset))
    return per


def merge_pipeline(base: str | os.PathLike[str], inputs: Sequence[MergeInput], out: str | os.PathLike[str],
                   options: MergeOptions, progress: Callable[[MergeEvent], None] | None = None) -> MergeSummary:
    """Merge ``inputs`` into the pipeline folder ``base``; write the whole pipeline at ``out``."""
    from .run import execute, plan  # the engine's front door, per component

    path = resolve(base, allow_patterns=["*"], what="base model")
    if options.checks:
        raise InputError("--check runs on one checkpoint; this base is a pipeline of several", path=path,
                         hint="check the merged components with their own tools")
    if options.to not in (None, "safetensors"):
        raise InputError(f"a pipeline folder is merged into a pipeline folder, not --to {options.to}", path=path)
    per = split_inputs(path, inputs)
    started = time.perf_counter()
    summary = MergeSummary(output=str(out))
    with atomic_output(out, force=options.force, directory=True,
                       inputs=[str(path), *(i.adapter.source for i in inputs)]) as tmp:
        for entry in sorted(path.iterdir()):
            if entry.name in per:
                part = execute(plan(entry, per[entry.name], replace(options, force=False), tmp / entry.name),
                               tmp / entry.name, progress)
                summary.warnings += [f"{entry.name}: {w}" for w in part.warnings]
                for field in ("tensors", "tensors_merged", "tensors_copied", "bytes_written", "shards"):
                    setattr(summary, field, getattr(summary, field) + getattr(part, field))
                summary.peak_rss_bytes = max(summary.peak_rss_bytes, part.peak_rss_bytes)
            elif entry.is_dir():
                shutil.copytree(entry, tmp / entry.name)
            else:
                shutil.copyfile(entry, tmp / entry.name)
    summary.seconds = time.perf_counter() - started
    return summary
