"""Commands that write checkpoints: merge, dequantize, requantize. Each builds :class:`MergeOptions`, asks the
engine for a plan and runs it; none holds logic of its own."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click

from .. import registry
from ..adapter_io import load
from ..checkpoint import Checkpoint
from ..engine import MergeEvent, MergeInput, MergeOptions, MergePlan, MergeSummary, QuantizeOptions, execute
from ..engine import plan as plan_merge
from ..engine.plan import quantizing_backends
from ..errors import CheckFailedError, InputError
from ..operations import unmerge as unmerge_op
from ..operations.convert import with_initial
from ..outputs import check_output
from .checks import check_options, check_requests
from .group import _fmt_bytes, cli, emit_json
from .options import (
    FINITE,
    Device,
    F,
    ParamType,
    allow_pickle_option,
    command_line,
    dtype_option,
    force_option,
    json_option,
    shard_size_option,
)


class _Progress:
    """A byte-based progress bar on stderr, shown only on a terminal and never with --json."""

    def __init__(self, enabled: bool, label: str):
        self.enabled = enabled and sys.stderr.isatty()
        self.label = label
        self.bar: Any = None

    def __call__(self, event: MergeEvent) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = click.progressbar(length=max(event.total_bytes, 1), label=self.label, file=sys.stderr)
            self.bar.__enter__()
        self.bar.update(event.nbytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


def _run(base: str | MergePlan, inputs: list[MergeInput], out: str, options: MergeOptions, label: str,
         json_: bool) -> MergeSummary:
    """Plan (unless given a plan) and execute, with a progress bar on a terminal."""
    bar = _Progress(enabled=not json_, label=label)
    try:
        planned = base if isinstance(base, MergePlan) else plan_merge(base, inputs, options)
        return execute(planned, out, progress=bar)
    finally:
        bar.close()


def _report(summary: MergeSummary, json_: bool, extra: dict[str, Any] | None = None, verb: str = "merged") -> None:
    for warning in summary.warnings:
        click.echo(f"warning: {warning}", err=True)
    _report_survival(summary.survival, quiet=json_)
    if json_:
        emit_json({**summary.to_json(), **(extra or {})})
        return
    merged = f"{summary.tensors_merged} {verb}, " if summary.tensors_merged else ""
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


def _weighted(refs: tuple[str, ...], weights: tuple[float, ...], flag: str, allow_pickle: bool) -> list[MergeInput]:
    if weights and len(weights) != len(refs):
        raise click.UsageError(f"{len(weights)} {flag} values for {len(refs)} adapters")
    return [MergeInput(load(ref, allow_pickle=allow_pickle), weights[i] if weights else 1.0)
            for i, ref in enumerate(refs)]


def _finish(summary: MergeSummary, json_: bool, out: str, extra: dict[str, Any] | None = None,
            verb: str = "merged") -> None:
    """Report a written output; exit 1 (output kept, verdicts in it) when a check failed."""
    _report(summary, json_, extra, verb)
    if not summary.checks_passed:
        raise CheckFailedError(f"a check failed; the output is kept at {out} for inspection")


@cli.command()
@click.argument("paths", nargs=-1, required=True, metavar="BASE ADAPTER [ADAPTER ...] OUT")
@click.option("--weight", "weights", type=FINITE, multiple=True,
              help="Weight of each adapter's delta, once per adapter in order (default 1).")
@engine_options("Output dtype; auto keeps the base's.")
@click.option("--requantize", is_flag=True,
              help="Quantized base only: write it quantized again (same settings; untouched layers copied byte "
                   "for byte) and report how much of each change survived.")
@click.option("--merge-base", type=click.Choice(["quantized", "original"]), default="quantized", show_default=True,
              help="Quantized base only: land the delta on the decoded weights, what QLoRA trained against, or on "
                   "the original 16-bit weights given by --original-base.")
@click.option("--original-base", metavar="PATH", help="The 16-bit checkpoint the quantized base was made from.")
@click.option("--initial", "initials", multiple=True, metavar="PATH",
              help="For an adapter trained on a modified base whose init cannot be recomputed (OLoRA/PiSSA-style): "
                   "the adapter saved right after init (once per adapter, in order).")
def merge(paths: tuple[str, ...], weights: tuple[float, ...], requantize: bool, merge_base: str,
          original_base: str | None, initials: tuple[str, ...], **kw: Any) -> None:
    """Merge one or more adapters into BASE and write a full checkpoint to OUT.

    BASE is a Hugging Face checkpoint folder (model.safetensors, or shards
    with an index) or a hub reference. The merge streams one tensor at a
    time: memory stays near the largest tensor, whatever the model size.
    Deltas are computed in fp32 and rounded once to the output dtype, which
    gives PEFT's merge_and_unload bit for bit.

    Tied embeddings stay tied unless the adapter changes them differently;
    then an explicit lm_head.weight is written and tie_word_embeddings set
    to false, so the merged model behaves like the unmerged one.

    A quantized BASE (QLoRA on bitsandbytes 4-bit) is decoded and merged into
    a dense model in the quant state's dtype: the faithful result.
    --requantize writes it quantized again and warns how much of the
    fine-tune the rounding erased.

    --check NAME runs a validator on OUT before it is published (see
    `adaptools plugins`): --check logits (does OUT compute what base + adapter
    computes, within the output dtype's rounding? seconds on a CPU), --check
    generate (greedy continuations, first divergence), --check perplexity
    --eval-text FILE. A failed check exits 1 and keeps OUT, with the verdict
    in adaptools_checks.json and its model card (docs/validation.md).

    \b
    Examples:
      adaptools merge meta-llama/Llama-3.2-1B ./my-lora ./merged
      adaptools merge ./base ./style ./facts ./out --weight 0.7 --weight 1
      adaptools merge ./base ./my-lora ./out --dtype bf16 --shard-size 5GB
      adaptools merge ./base ./my-lora ./out --dry-run --json
      adaptools merge ./llama-nf4 ./my-qlora ./merged --check logits --check generate
    """
    if len(paths) < 3:
        raise click.UsageError("give BASE, at least one ADAPTER, and OUT")
    base, adapter_refs, out = paths[0], paths[1:-1], paths[-1]
    if weights and len(weights) != len(adapter_refs):
        raise click.UsageError(f"{len(weights)} --weight values for {len(adapter_refs)} adapters")
    if initials and len(initials) != len(adapter_refs):
        raise click.UsageError(f"{len(initials)} --initial values for {len(adapter_refs)} adapters")
    quantize = None
    if merge_base == "original":
        if not original_base:
            raise click.UsageError("--merge-base original needs --original-base PATH (the 16-bit checkpoint)")
        quantize = quantize_options_of(base) if requantize else None
        base, requantize = original_base, False
    elif original_base:
        raise click.UsageError("--original-base is only used with --merge-base original")
    options = _engine_options(kw, requantize=requantize, quantize=quantize)
    allow_pickle, dry_run, json_ = kw["allow_pickle"], kw["dry_run"], kw["json_"]
    if not dry_run:
        check_output(out, kw["force"], [base, *adapter_refs, *initials])
    inputs = _weighted(adapter_refs, weights, "--weight", allow_pickle)
    for item, initial in zip(inputs, initials):
        item.adapter = with_initial(item.adapter, load(initial, allow_pickle=allow_pickle))
    if dry_run:
        data = plan_merge(base, inputs, options).to_json()
        emit_json(data) if json_ else _echo_plan(data)
        return
    _finish(_run(base, inputs, out, options, "merging", json_), json_, out)


@cli.command()
@click.argument("paths", nargs=-1, required=True, metavar="MERGED ADAPTER [ADAPTER ...] OUT")
@click.option("--weight", "weights", type=FINITE, multiple=True,
              help="The weight each adapter was merged with, once per adapter in order (default 1).")
@click.option("--base", "original", metavar="PATH",
              help="The original base: report how far OUT is from it (elements equal, max |Δ|, relative).")
@engine_options("Output dtype; auto keeps MERGED's.")
def unmerge(paths: tuple[str, ...], weights: tuple[float, ...], original: str | None, **kw: Any) -> None:
    """Take merged adapters back out of MERGED and write the model to OUT.

    The inverse of `adaptools merge`, streamed the same way: each adapter's
    delta is computed exactly as the merge computed it and subtracted, in
    fp32, rounded once. Merged again, the result gives MERGED back bit for
    bit (in every case measured), so it is the original base wherever the
    merge's own rounding kept the base's value, and at most one rounding of
    the merged value away elsewhere (docs/unmerge.md). Give --base ORIGINAL
    to measure how far OUT is from it. Adapters whose merge cannot be undone are refused, naming why (DoRA,
    replaced modules, trainable tokens, bottleneck folds with a singular map).

    \b
    Examples:
      adaptools unmerge ./merged ./my-lora ./base-again
      adaptools unmerge ./merged ./style ./facts ./base-again --weight 0.7 --weight 1
      adaptools unmerge ./merged ./my-lora ./base-again --base ./base --check logits
    """
    if len(paths) < 3:
        raise click.UsageError("give MERGED, at least one ADAPTER, and OUT")
    merged, refs, out = paths[0], paths[1:-1], paths[-1]
    options = _engine_options(kw)
    if original is not None:
        Checkpoint.open(original)  # refuse an unusable --base before anything is written
    if not kw["dry_run"]:
        check_output(out, kw["force"], [merged, *refs, *([original] if original else [])])
    removed = _weighted(refs, weights, "--weight", kw["allow_pickle"])
    _write(unmerge_op.unmerge_plan(merged, removed, options), out, kw, "unmerging", original)


@cli.command()
@click.argument("merged")
@click.argument("out", type=click.Path())
@click.option("--remove", "removed", multiple=True, required=True, metavar="ADAPTER",
              help="An adapter merged into MERGED, to take out (repeatable).")
@click.option("--add", "added", multiple=True, required=True, metavar="ADAPTER",
              help="An adapter to merge in its place (repeatable).")
@click.option("--remove-weight", type=FINITE, multiple=True,
              help="The weight each removed adapter was merged with, once per --remove (default 1).")
@click.option("--add-weight", type=FINITE, multiple=True,
              help="Weight of each added adapter, once per --add (default 1).")
@engine_options("Output dtype; auto keeps MERGED's.")
def swap(merged: str, out: str, removed: tuple[str, ...], added: tuple[str, ...], remove_weight: tuple[float, ...],
         add_weight: tuple[float, ...], **kw: Any) -> None:
    """Replace merged adapters with others in one streamed pass, without the base.

    Switches a deployed model from one task-specific fine-tune to another:
    each --remove adapter is taken out (as `adaptools unmerge` does) and each
    --add adapter merged in (as `adaptools merge` does), tensor by tensor,
    rounding once. In fp32 the result equals a fresh merge of the added
    adapters into the base wherever unmerging recovers the base
    (docs/unmerge.md).

    \b
    Examples:
      adaptools swap ./merged-support --remove ./support-lora --add ./sales-lora ./merged-sales
      adaptools swap ./merged --remove ./a --add ./b ./out --check logits
    """
    options = _engine_options(kw)
    if not kw["dry_run"]:
        check_output(out, kw["force"], [merged, *removed, *added])
    taken = _weighted(removed, remove_weight, "--remove-weight", kw["allow_pickle"])
    given = _weighted(added, add_weight, "--add-weight", kw["allow_pickle"])
    _write(unmerge_op.unmerge_plan(merged, taken, options, given), out, kw, "swapping", None)


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


@cli.command()
@click.argument("base")
@click.argument("out", type=click.Path())
@dtype_option("Output dtype; auto uses each weight's original dtype (from its quant state).")
@shard_size_option
@force_option
@json_option
def dequantize(base: str, out: str, dtype: str, shard_size: int | None, force: bool, json_: bool) -> None:
    """Turn a quantized checkpoint (bitsandbytes 4-bit or 8-bit) into a dense one.

    The output loads in transformers without bitsandbytes: quantization_config
    is removed and every quantized weight is decoded exactly as its library
    decodes it, one tensor at a time.

    \b
    Example:
      adaptools dequantize ./llama-3-8b-nf4 ./llama-3-8b-bf16
    """
    check_output(out, force, [base])
    options = MergeOptions(dtype=dtype, shard_size=shard_size, force=force, command=command_line(),
                           operation="dequantize")
    _report(_run(base, [], out, options, "dequantizing", json_), json_)


def _report_survival(survival: list[dict[str, Any]], quiet: bool = False) -> None:
    """Summarise how much of the change survived requantization; warn on stderr when most was lost."""
    if not survival:
        return
    kept = sorted(s["retained"] for s in survival)
    median = kept[len(kept) // 2]
    lost = sum(1 for k in kept if k < 0.5)
    if not quiet:
        click.echo(f"requantized {len(kept)} changed layers: median share of the change kept {median:.0%} "
                   f"(min {kept[0]:.0%}, max {kept[-1]:.0%})")
    if lost:
        click.echo(f"WARNING: in {lost} of {len(kept)} layers requantizing erased more than half of the "
                   "adapter's change; the quantized model has largely lost the fine-tune. Merge without "
                   "--requantize for a faithful 16-bit model.", err=True)


def quantize_options_of(base: str) -> QuantizeOptions:
    """The settings a quantized checkpoint was made with, as the backend that made it reads its config."""
    config = Checkpoint.open(base).config.get("quantization_config") or {}
    for entry in registry.backends().values():
        options = entry.obj.quantize_options(config)
        if options is not None:
            return options  # type: ignore[no-any-return]
    raise InputError("the base is not a quantized checkpoint that an installed backend made", path=base,
                     hint="--merge-base original needs the quantized base as BASE")


class QuantType(ParamType):
    """A registered backend that can quantize dense weights (see `adaptools plugins`)."""

    name = "quant_type"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        names = quantizing_backends()
        if value not in names:
            self.fail(f"{value!r} is not one of {', '.join(names)}", param, ctx)
        return str(value)


@cli.command()
@click.argument("dense")
@click.argument("out", type=click.Path())
@click.option("--quant-type", type=QuantType(),
              help="The backend that quantizes (default: the first installed that can; see `adaptools plugins`).")
@click.option("--blocksize", type=click.Choice(["32", "64", "128", "256", "512", "1024", "2048", "4096"]),
              default="64", show_default=True, help="Elements per absmax block (transformers always uses 64).")
@click.option("--double-quant/--no-double-quant", default=True, show_default=True,
              help="Quantize the absmax values too (bnb_4bit_use_double_quant).")
@click.option("--skip-modules", default="", help="Comma-separated module names to keep dense (besides "
              "lm_head, embeddings and norms, which always stay dense).")
@force_option
@json_option
def requantize(dense: str, out: str, quant_type: str | None, blocksize: str, double_quant: bool, skip_modules: str,
               force: bool, json_: bool) -> None:
    """Quantize a dense checkpoint as transformers would (bitsandbytes NF4/FP4 by default).

    Linear weights become 4-bit with bytes identical to bitsandbytes' own
    quantize_4bit; lm_head, embeddings and norms stay dense. The result
    loads with transformers' bitsandbytes integration (quantization_config
    is written). Quantizing costs accuracy; see `adaptools merge --help`.

    \b
    Example:
      adaptools requantize ./merged-bf16 ./merged-nf4
    """
    check_output(out, force, [dense])
    quantize = QuantizeOptions(quant_type=quant_type or "", blocksize=int(blocksize), double_quant=double_quant,
                               skip_modules=tuple(filter(None, (m.strip() for m in skip_modules.split(",")))))
    options = MergeOptions(force=force, quantize=quantize, operation="requantize", command=command_line())
    _report(_run(dense, [], out, options, "quantizing", json_), json_)

