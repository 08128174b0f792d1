"""Run a plan: compute every entry, write every shard, finalize and check, all inside the temporary
output, then publish it with one rename. ``merge`` is the library's front door.
"""

from __future__ import annotations

import gc
import os
import resource
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .. import registry
from ..checkpoint import Checkpoint
from ..errors import InputError
from ..interfaces import ValidationContext
from ..outputs import atomic_output
from .components import is_pipeline, merge_pipeline
from .compute import Compute, Produced
from .containers import FOLDER
from .entries import MergePlan, Slot
from .finalize import provenance, record_checks
from .options import MergeEvent, MergeInput, MergeOptions, MergeSummary
from .plan import build_plan
from .source import BufferPool, Prefetch, Reader

Progress = Callable[[MergeEvent], None]
#: Quantized entries encoding (or waiting to) while the next is computed; each holds its merged value.
ENCODING_AHEAD = 2


def workers_for(options: MergeOptions) -> int:
    return options.workers or len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        options.workers or os.cpu_count() or 1)


@contextmanager
def _torch_threads(device: str, workers: int) -> Iterator[None]:
    """On the CPU the engine parallelises over row blocks, so each torch kernel runs on one thread. Planning too:
    it checks many small tensors (a quantized base's scales), where a parallel region waits for a core the
    other threads, or another process, hold (measured: 0.1 s a check instead of 0.5 ms on a busy 2-core machine)."""
    if device != "cpu" or workers <= 1:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def plan(base: str | os.PathLike[str], inputs: Sequence[MergeInput], options: MergeOptions,
         out: str | os.PathLike[str] | None = None) -> MergePlan:
    """Open the base and build the plan (what ``merge --dry-run`` prints); ``out`` chooses the output
    container by its suffix when ``options.to`` does not name one."""
    started = time.perf_counter()
    if is_pipeline(base):
        raise InputError("this base is a pipeline folder (model_index.json): it is merged component by component, "
                         "each planned on its own", path=base,
                         hint="plan one component (BASE/unet), or merge without --dry-run")
    for check in options.checks:
        registry.get_validator(check.name).check_options(dict(check.options))
    with _torch_threads(options.device, workers_for(options)):  # planning reads and checks small tensors
        built = build_plan(Checkpoint.open(base), inputs, options, out)
    built.seconds = time.perf_counter() - started
    return built


def execute(plan: MergePlan, out: str | os.PathLike[str], progress: Progress | None = None) -> MergeSummary:
    """Write the planned output at ``out``; checks run on it before it is published."""
    started = time.perf_counter()
    options = plan.options
    checkpoint = plan.checkpoint
    summary = MergeSummary(output=str(out), untied_lm_head=plan.untied, vocab_size=plan.vocab_size,
                           warnings=list(plan.warnings))
    record = provenance(checkpoint, plan.inputs, options.command, options.hash_base, options.operation)
    container = plan.container or FOLDER
    summary.survival_hint = container.survival_hint
    total = plan.total_bytes
    workers = workers_for(options)
    inputs = [str(checkpoint.path), *(i.adapter.source for i in plan.inputs)]
    timings = {"plan": plan.seconds}
    written = 0.0
    pool = BufferPool()
    # a one-file output laid out in several parts (a split model): each part written and published beside it
    parts = [shard.name for shard in plan.shards] if not container.directory and len(plan.shards) > 1 else []
    with atomic_output(out, force=options.force, directory=container.directory, inputs=inputs,
                       parts=parts) as tmp, \
            _torch_threads(options.device, workers), Reader(checkpoint, pool) as reader:
        compute = Compute(checkpoint, reader, pool, options.device, workers)
        # quantized groups are encoded in a thread of their own, overlapping the next entries' arithmetic
        encoder = ThreadPoolExecutor(1, thread_name_prefix="adaptools-encode") if any(
            s.entry is not None and s.entry.group is not None for shard in plan.shards for s in shard.slots) else None
        prefetch = Prefetch(reader, [s.entry.source for shard in plan.shards for s in shard.slots if s.raw is None])
        gc_was_enabled = gc.isenabled()
        gc.disable()  # the run allocates many small objects (tensor views) and frees them at once; no cycles
        try:
            t0 = time.perf_counter()
            for shard in plan.shards:
                at = tmp / shard.name if container.directory else tmp.parent / shard.name if parts else tmp
                with container.writer(at, shard, plan, record) as writer:
                    pending: deque[tuple[Slot, Future[Produced] | None]] = deque()

                    def emit(slot: Slot, produced: Produced | None) -> None:
                        if produced is None:
                            assert slot.raw is not None  # only a stored tensor is queued without a value
                            src, info = reader.raw(slot.raw)
                            writer.copy(slot.raw, src, info)
                            nbytes, merged = info.nbytes, False
                        else:
                            nbytes = 0
                            for name, tensor in produced.tensors.items():
                                done = (lambda t=tensor: pool.give(t)) if any(
                                    tensor is p for p in produced.pooled) else None
                                writer.write(name, tensor, done)
                                nbytes += tensor.numel() * tensor.element_size()
                            if produced.survival is not None:
                                summary.survival.append(produced.survival.__dict__)
                            merged = slot.entry.merged
                        summary.tensors += 1
                        summary.bytes_written += nbytes
                        summary.tensors_merged += int(merged)
                        summary.tensors_copied += int(slot.raw is not None)
                        if progress is not None:
                            progress(MergeEvent(slot.raw or slot.entry.name, shard.name, nbytes, merged, total))

                    def drain(keep: int) -> None:
                        """Write finished slots in plan order; wait for the oldest while more than ``keep``
                        are in flight (each holds its merged value)."""
                        while pending and (len(pending) > keep or pending[0][1] is None or pending[0][1].done()):
                            slot, future = pending.popleft()
                            emit(slot, future.result() if future is not None else None)

                    for slot in shard.slots:
                        if slot.raw is not None:
                            pending.append((slot, None))  # copied once the slots before it are written
                        else:
                            finish = compute.start(slot.entry, prefetch.get(slot.entry.source))
                            if encoder is not None and slot.entry.group is not None:
                                pending.append((slot, encoder.submit(finish)))
                            else:
                                produced = finish()
                                drain(0)
                                emit(slot, produced)
                        drain(ENCODING_AHEAD)
                    drain(0)
                written += writer.seconds
            t1 = time.perf_counter()
            container.finalize(tmp, plan, record)
            t2 = time.perf_counter()
            summary.checks = _run_checks(plan, tmp.parent / parts[0] if parts else tmp)
            if summary.checks and container.directory:  # a single-file output has no beside: the summary says it
                record_checks(tmp, summary.checks)
            timings.update(read=reader.seconds, compute=compute.seconds["compute"], encode=compute.seconds["encode"],
                           write_background=written, shards=t1 - t0, finalize=t2 - t1, checks=time.perf_counter() - t2)
        finally:
            if encoder is not None:
                encoder.shutdown(wait=True, cancel_futures=True)
            prefetch.close()
            compute.close()
            if gc_was_enabled:
                gc.enable()
    if parts:  # the set is opened by its first part
        summary.output = str(Path(out).parent / parts[0])
    summary.shards = len(plan.shards)
    summary.seconds = time.perf_counter() - started
    summary.profile = timings
    summary.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return summary


def _run_checks(plan: MergePlan, tmp: Path) -> list[dict[str, Any]]:
    """Each requested validator on the finished (not yet published) output."""
    results = []
    for check in plan.options.checks:
        context = ValidationContext(plan.options.operation, str(plan.checkpoint.path),
                                    [i.adapter for i in plan.inputs], str(tmp),
                                    {**check.options, "weights": [i.weight for i in plan.inputs],
                                     "removed": [i.invert for i in plan.inputs]})
        verdict = registry.get_validator(check.name).validate(context)
        results.append({"name": check.name, "passed": verdict.passed, "message": verdict.message,
                        "figures": verdict.figures})
    return results


def merge(base: str | os.PathLike[str], inputs: Sequence[MergeInput], out: str | os.PathLike[str],
          options: MergeOptions | None = None, *, progress: Progress | None = None, **overrides: Any) -> MergeSummary:
    """Merge ``inputs`` into the checkpoint ``base`` and write a checkpoint folder at ``out``; a pipeline
    folder (``model_index.json``) is merged component by component (components.py).

    Args:
        base: a local checkpoint folder or a hub reference.
        inputs: adapters (already loaded and validated) with weights.
        out: the output folder (or file, for a single-file container: ``options.to``, or chosen by the
            path's suffix); written to a temporary sibling and renamed into place at the end.
        options: how to merge (:class:`MergeOptions`); keyword ``overrides`` set single fields
            (``merge(base, inputs, out, dtype="bf16")``).
        progress: called once per written tensor.

    Raises:
        AdaptoolsError subclasses for anything the user can fix; nothing is written then.
    """
    options = replace(options or MergeOptions(), **overrides)
    if is_pipeline(base):
        return merge_pipeline(base, inputs, out, options, progress)
    return execute(plan(base, inputs, options, out), out, progress)
