"""``adaptools unmerge`` and ``swap``: take merged adapters back out of a merged model, streaming, through the
merge engine (each method's ``unmerge_updates``; docs/unmerge.md), and measure how far the result is from
the original base when the caller has it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ..checkpoint import Checkpoint
from ..engine import MergeInput, MergeOptions, MergePlan, MergeSummary, execute, plan
from ..engine.finalize import adapter_files, sha256
from ..engine.run import Progress
from ..errors import InputError
from ..jsonio import parse_json
from ..schema import META_PROVENANCE
from .extract import diff_checkpoints


def unmerge_plan(merged: str | os.PathLike[str], removed: Sequence[MergeInput], options: MergeOptions,
                 added: Sequence[MergeInput] = ()) -> MergePlan:
    """The plan that takes ``removed`` out of ``merged`` (and, for a swap, merges ``added`` in the same pass).

    Each removed input carries the weight it was merged with. The operation recorded is ``unmerge``, or
    ``swap`` when adapters are added.
    """
    if not removed:
        raise InputError("nothing to take out: give at least one adapter to remove")
    inputs = [replace(i, invert=True) for i in removed] + [replace(i, invert=False) for i in added]
    options = replace(options, operation="swap" if added else "unmerge")
    built = plan(merged, inputs, options)
    built.warnings += provenance_warnings(built.checkpoint, removed)
    return built


def provenance_warnings(merged: Checkpoint, removed: Sequence[MergeInput]) -> list[str]:
    """When adaptools wrote ``merged``, whether its provenance lists each adapter to remove (by file hash)
    with the same weight: subtracting a delta that was never added leaves a model nobody trained. Silent
    when there is no provenance (another tool merged it)."""
    raw = merged.shards[0].header.metadata.get(META_PROVENANCE) if merged.shards else None
    try:
        record = parse_json(raw) if raw else None
    except InputError:
        return []
    listed = record.get("adapters") if isinstance(record, dict) and record.get("operation") in ("merge", "swap") \
        else None
    if not isinstance(listed, list):
        return []
    weights: dict[str, Any] = {}
    for entry in listed:
        if isinstance(entry, dict) and not entry.get("removed") and isinstance(entry.get("files"), list):
            for f in entry["files"]:
                if isinstance(f, dict) and isinstance(f.get("sha256"), str):
                    weights[f["sha256"]] = entry.get("weight")
    warnings = []
    for item in removed:
        hashes = [sha256(p) for p in adapter_files(item.adapter) if p.suffix == ".safetensors"]
        found = [weights[h] for h in hashes if h in weights]
        if hashes and not found:
            warnings.append(f"{item.adapter.source}: the merged model's provenance does not list this adapter "
                            "among those merged into it; removing it subtracts a change that was never added")
        elif found and found[0] != item.weight:
            warnings.append(f"{item.adapter.source}: merged with weight {found[0]}, removed with weight "
                            f"{item.weight}; give the weight it was merged with (--weight)")
    return warnings


def unmerge(merged: str | os.PathLike[str], removed: Sequence[MergeInput], out: str | os.PathLike[str],
            options: MergeOptions | None = None, *, added: Sequence[MergeInput] = (), progress: Progress | None = None,
            **overrides: Any) -> MergeSummary:
    """Take ``removed`` (each with the weight it was merged with) out of the checkpoint ``merged`` and write
    the result at ``out``; with ``added``, merge those in the same pass (a swap). Like ``merge``: streamed,
    checks run on the unpublished output, nothing written on error."""
    options = replace(options or MergeOptions(), **overrides)
    return execute(unmerge_plan(merged, removed, options, added), out, progress)


def distance(out: str | os.PathLike[str], original: str | os.PathLike[str]) -> dict[str, Any]:
    """How far ``out`` is from the ``original`` base: over every shared tensor, the largest |Δ|, the largest
    relative difference ‖Δ‖/‖base‖ of a tensor, and how many elements and tensors are equal."""
    data = diff_checkpoints(original, out)
    rows = data["tensors"]
    elements = sum(r["elements"] for r in rows)
    differing = sum(r["differing"] for r in rows)
    return {"original": str(original), "tensors": len(rows),
            "tensors_equal": sum(1 for r in rows if r["differing"] == 0),
            "elements": elements, "elements_differing": differing,
            "share_equal": 1 - differing / elements if elements else 1.0,
            "max_abs": max((r["max_abs"] for r in rows), default=0.0),
            "max_relative": max((r["relative"] for r in rows), default=0.0),
            "only_in_original": data["only_in_a"], "only_in_output": data["only_in_b"]}
