"""What the commands that write checkpoints through the engine share: their options, the progress bar,
the report, the dry-run plan for people."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

from ..adapter_io import load
from ..backend import OutputContainer
from ..engine import MergeEvent, MergeInput, MergeOptions, MergePlan, MergeSummary, execute
from ..engine import plan as plan_merge
from ..engine.components import is_pipeline, merge_pipeline
from ..engine.quantized import SurvivalVerdict
from ..errors import CheckFailedError
from ..operations import unmerge as unmerge_op
from ..progress import LazyBar
from .checks import check_options, check_requests
from .group import _fmt_bytes, emit_json
from .options import (
    Device,
    F,
    allow_pickle_option,
    command_line,
    dtype_option,
    force_option,
    json_option,
    shard_size_option,
)


class _Progress:
    """The engine's progress events (bytes written) on the one progress bar; never with --json."""

    def __init__(self, enabled: bool, label: str):
        self.bar = LazyBar(label, enabled=enabled)

    def __call__(self, event: MergeEvent) -> None:
        self.bar.advance(event.total_bytes, event.nbytes)

    def close(self) -> None:
        self.bar.close()


@contextmanager
def engine_progress(label: str, json_: bool) -> Iterator[_Progress]:
    """The engine's progress callback for one run, closed at the end whatever happens."""
    bar = _Progress(enabled=not json_, label=label)
    try:
        yield bar
    finally:
        bar.close()


def _run(base: str | MergePlan, inputs: list[MergeInput], out: str, options: MergeOptions, label: str,
         json_: bool) -> MergeSummary:
    """Plan (unless given a plan) and execute, with a progress bar on a terminal."""
    with engine_progress(label, json_) as bar:
        if not isinstance(base, MergePlan) and is_pipeline(base):
            return merge_pipeline(base, inputs, out, options, progress=bar)
        planned = base if isinstance(base, MergePlan) else plan_merge(base, inputs, options, out)
        return execute(planned, out, progress=bar)


def _report(summary: MergeSummary, json_: bool, extra: dict[str, Any] | None = None, verb: str = "merged") -> None:
    for warning in summary.warnings:
        click.echo(f"warning: {warning}", err=True)
    _report_survival(summary.survival, summary.survival_hint, quiet=json_)
    if json_:
        emit_json({**summary.to_json(), **(extra or {})})
        return
    merged = f"{summary.tensors_merged} {verb}, " if summary.tensors_merged else ""
    converted = summary.tensors - summary.tensors_merged - summary.tensors_copied
    merged += f"{converted} converted, " if converted else ""
    click.echo(f"wrote {summary.output}: {summary.tensors} tensors in {summary.shards} shard(s), {merged}"
               f"{summary.tensors_copied} copied byte for byte, {_fmt_bytes(summary.bytes_written)} in "
               f"{summary.seconds:.1f} s, peak memory {_fmt_bytes(summary.peak_rss_bytes)}")
    if summary.untied_lm_head:
        click.echo("note: lm_head now differs from the input embedding; written explicitly and "
                   "tie_word_embeddings set to false")
    for check in summary.checks:
        click.echo(f"check {check['name']}: {'passed' if check['passed'] else 'FAILED'}: {check['message']}")
    distance = (extra or {}).get("distance")
    if distance:
        click.echo(f"distance from {distance['original']}: {distance['elements'] - distance['elements_differing']} "
                   f"of {distance['elements']} elements equal ({distance['share_equal']:.4%}; "
                   f"{distance['tensors_equal']} of {distance['tensors']} tensors bit for bit), max |Δ| "
                   f"{distance['max_abs']:.3g}, max relative ‖Δ‖/‖base‖ {distance['max_relative']:.3g}")


def engine_options(dtype_help: str) -> Callable[[F], F]:
    """The options every command that writes a checkpoint through the engine shares (merge, unmerge, swap)."""
    def decorate(f: F) -> F:
        for option in reversed((
            dtype_option(dtype_help),
            click.option("--device", type=Device(), default="cpu", show_default=True,
                         help="Where the fp32 arithmetic runs: cpu, cuda or cuda:N."),
            shard_size_option, force_option, check_options,
            click.option("--ignore-base-mismatch", is_flag=True,
                         help="Go ahead even if an adapter says it was trained on another architecture."),
            allow_pickle_option,
            click.option("--hash-base", is_flag=True,
                         help="Record the sha256 of local base shards (an extra full read)."),
            click.option("--dry-run", is_flag=True, help="Print the plan (what would be merged, cast, copied, "
                         "untied, resized, written) and exit."),
            click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
                         help="Threads for the arithmetic (0: one per core)."),
            json_option,
        )):
            f = option(f)
        return f
    return decorate


def _engine_options(kw: dict[str, Any], **extra: Any) -> MergeOptions:
    """MergeOptions from the shared options (``kw`` also holds the validators' own flags)."""
    requests = check_requests(kw["checks"], kw["check_option_pairs"],
                              {k: v for k, v in kw.items() if k.startswith("checkflag_")})
    return MergeOptions(dtype=kw["dtype"], device=kw["device"], shard_size=kw["shard_size"], force=kw["force"],
                        ignore_base_mismatch=kw["ignore_base_mismatch"], hash_base=kw["hash_base"],
                        command=command_line(), checks=requests, workers=kw["workers"], **extra)


def _weighted(refs: tuple[str, ...], weights: tuple[float, ...], flag: str, allow_pickle: bool,
              base: str) -> list[MergeInput]:
    """The adapters with their weights, each read knowing the model it goes into (a GGUF LoRA without head
    counts takes them from it)."""
    if weights and len(weights) != len(refs):
        raise click.UsageError(f"{len(weights)} {flag} values for {len(refs)} adapters")
    return [MergeInput(load(ref, allow_pickle=allow_pickle, base=base), weights[i] if weights else 1.0)
            for i, ref in enumerate(refs)]


def _finish(summary: MergeSummary, json_: bool, out: str, extra: dict[str, Any] | None = None,
            verb: str = "merged") -> None:
    """Report a written output; exit 1 (output kept, verdicts in it) when a check failed."""
    _report(summary, json_, extra, verb)
    if not summary.checks_passed:
        raise CheckFailedError(f"a check failed; the output is kept at {out} for inspection")


def _write(planned: MergePlan, out: str, kw: dict[str, Any], label: str, original: str | None) -> None:
    """Print a dry run's plan, or write it and report (with the distance from ``original`` when given)."""
    json_ = kw["json_"]
    if kw["dry_run"]:
        data = planned.to_json()
        emit_json(data) if json_ else _echo_plan(data)
        return
    summary = _run(planned, [], out, planned.options, label, json_)
    extra = {"distance": unmerge_op.distance(out, original)} if original else None
    _finish(summary, json_, out, extra, verb="changed")


def _echo_plan(data: dict[str, Any]) -> None:
    """The dry-run plan for people."""
    click.echo(f"plan: {data['operation']} into {data['base']}")
    for a in data["adapters"]:
        removed = ", removed" if a.get("removed") else ""
        click.echo(f"  adapter {a['source']} ({a['method']}, weight {a['weight']}{removed})")
    click.echo(f"{data['tensors']} tensors: {len(data['merged'])} merged, {len(data['cast'])} cast, "
               f"{data['copied']} copied byte for byte")
    for name in data["untied"]:
        click.echo(f"  untied: {name} (written explicitly)")
    for name, (old, new) in data["resized"].items():
        click.echo(f"  resized: {name} {old} -> {new}")
    for warning in data["warnings"]:
        click.echo(f"  warning: {warning}")
    if data["config_changes"]:
        click.echo(f"config.json changes: {json.dumps(data['config_changes'], sort_keys=True)}")
    for shard in data["shards"]:
        approx = "~" if shard["estimated"] else ""
        click.echo(f"  {shard['file']}: {shard['tensors']} tensors, {approx}{_fmt_bytes(shard['bytes'])}")


def _report_survival(survival: list[dict[str, Any]], hint: str, quiet: bool = False) -> None:
    """Print the engine's survival verdict: a summary line, and a warning on stderr naming the layers that lost
    most of their change (fewest kept first) and what to do (``hint``, the output container's advice)."""
    verdict = SurvivalVerdict.of(survival)
    if verdict is None:
        return
    if not quiet:
        click.echo(f"requantized {verdict.layers} changed layers: median share of the change kept "
                   f"{verdict.median_retained:.0%} (min {verdict.min_retained:.0%}, max {verdict.max_retained:.0%}); "
                   f"median rounding error {verdict.median_error:.0%} of the change")
    if verdict.lost:
        lost = verdict.lost
        names = ", ".join(f"{name} ({share:.0%})" for name, share in lost[:4]) + (", ..." if len(lost) > 4 else "")
        fix = hint or OutputContainer.survival_hint  # a pipeline folder's summary names no container
        click.echo(f"WARNING: in {len(lost)} of {verdict.layers} layers requantizing erased more than half of the "
                   f"adapter's change ({names}); the quantized model has largely lost the fine-tune. {fix}",
                   err=True)
