"""Commands that write checkpoints: merge, dequantize, requantize. Each builds :class:`MergeOptions`, asks the
engine for a plan and runs it; none holds logic of its own."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from .. import registry
from ..adapter_io import load
from ..checkpoint import Checkpoint
from ..engine import MergeEvent, MergeInput, MergeOptions, MergeSummary, QuantizeOptions, execute
from ..engine import plan as plan_merge
from ..errors import CheckFailedError, InputError
from ..interfaces import Backend
from ..outputs import check_output
from .checks import check_options, check_requests
from .group import _fmt_bytes, cli, emit_json
from .options import (
    FINITE,
    Device,
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


def _run(base: str, inputs: list[MergeInput], out: str, options: MergeOptions, label: str, json_: bool) -> MergeSummary:
    bar = _Progress(enabled=not json_, label=label)
    try:
        return execute(plan_merge(base, inputs, options, out), out, progress=bar)
    finally:
        bar.close()


def _report(summary: MergeSummary, json_: bool) -> None:
    for warning in summary.warnings:
        click.echo(f"warning: {warning}", err=True)
    _report_survival(summary.survival, quiet=json_)
    if json_:
        emit_json(summary.to_json())
        return
    merged = f"{summary.tensors_merged} merged, " if summary.tensors_merged else ""
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


@cli.command()
@click.argument("paths", nargs=-1, required=True, metavar="BASE ADAPTER [ADAPTER ...] OUT")
@click.option("--weight", "weights", type=FINITE, multiple=True,
              help="Weight of each adapter's delta, once per adapter in order (default 1).")
@dtype_option("Output dtype; auto keeps the base's.")
@click.option("--device", type=Device(), default="cpu", show_default=True,
              help="Where the fp32 arithmetic runs: cpu, cuda or cuda:N.")
@shard_size_option
@force_option
@check_options
@click.option("--ignore-base-mismatch", is_flag=True,
              help="Merge even if the adapter says it was trained on another architecture.")
@allow_pickle_option
@click.option("--hash-base", is_flag=True, help="Record the sha256 of local base shards (an extra full read).")
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
@click.option("--dry-run", is_flag=True,
              help="Print the plan (what would be merged, cast, copied, untied, resized, written) and exit.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Threads for the arithmetic (0: one per core).")
@click.option("--to", "to", metavar="CONTAINER",
              help="Write OUT in another container than a checkpoint folder: one a backend offers (`adaptools "
                   "plugins` lists them). An OUT ending in a container's suffix chooses it without --to.")
@click.option("--outtype", metavar="TYPE",
              help="The storage type, for containers that offer several (see the container's documentation).")
@json_option
def merge(paths: tuple[str, ...], weights: tuple[float, ...], dtype: str, device: str, shard_size: int | None,
          force: bool, checks: tuple[str, ...], check_option_pairs: tuple[str, ...], ignore_base_mismatch: bool,
          allow_pickle: bool, hash_base: bool, requantize: bool, merge_base: str, original_base: str | None,
          initials: tuple[str, ...], dry_run: bool, workers: int, to: str | None, outtype: str | None, json_: bool,
          **check_flags: Any) -> None:
    """Merge one or more adapters into BASE and write a full checkpoint to OUT.

    BASE is a Hugging Face checkpoint folder (model.safetensors, or shards
    with an index) or a hub reference. The merge streams one tensor at a
    time: memory stays near the largest tensor, whatever the model size.
    BASE may also be one model file of a format an installed backend reads
    (`adaptools plugins`); OUT is then a file of that format (--to, or its
    suffix), untouched tensors copied byte for byte.
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
    `adaptools plugins`; e.g. --check perplexity --eval-text FILE). A failed
    check exits 1 and keeps OUT, with the verdict in adaptools_checks.json
    and its model card.

    \b
    Examples:
      adaptools merge meta-llama/Llama-3.2-1B ./my-lora ./merged
      adaptools merge ./base ./style ./facts ./out --weight 0.7 --weight 1
      adaptools merge ./base ./my-lora ./out --dtype bf16 --shard-size 5GB
      adaptools merge ./base ./my-lora ./out --dry-run --json
    """
    if len(paths) < 3:
        raise click.UsageError("give BASE, at least one ADAPTER, and OUT")
    base, adapter_refs, out = paths[0], paths[1:-1], paths[-1]
    if weights and len(weights) != len(adapter_refs):
        raise click.UsageError(f"{len(weights)} --weight values for {len(adapter_refs)} adapters")
    if initials and len(initials) != len(adapter_refs):
        raise click.UsageError(f"{len(initials)} --initial values for {len(adapter_refs)} adapters")
    requests = check_requests(checks, check_option_pairs, check_flags)
    quantize = None
    if merge_base == "original":
        if not original_base:
            raise click.UsageError("--merge-base original needs --original-base PATH (the 16-bit checkpoint)")
        quantize = quantize_options_of(base) if requantize else None
        base, requantize = original_base, False
    elif original_base:
        raise click.UsageError("--original-base is only used with --merge-base original")
    options = MergeOptions(dtype=dtype, device=device, shard_size=shard_size, force=force,
                           ignore_base_mismatch=ignore_base_mismatch, hash_base=hash_base, command=command_line(),
                           requantize=requantize, quantize=quantize, checks=requests, workers=workers, to=to,
                           outtype=outtype)
    if not dry_run:
        check_output(out, force, [base, *adapter_refs, *initials])
    inputs = [MergeInput(load(ref, allow_pickle=allow_pickle), weights[i] if weights else 1.0)
              for i, ref in enumerate(adapter_refs)]
    for item, initial in zip(inputs, initials):
        method = registry.get_method(item.adapter.method)
        method.require("plain", item.adapter)
        item.adapter = method.to_plain(item.adapter, None, None,  # type: ignore[attr-defined]
                                       load(initial, allow_pickle=allow_pickle))
    if dry_run:
        data = plan_merge(base, inputs, options, out).to_json()
        emit_json(data) if json_ else _echo_plan(data)
        return
    summary = _run(base, inputs, out, options, "merging", json_)
    _report(summary, json_)
    if not summary.checks_passed:
        raise CheckFailedError(f"a check failed; the output is kept at {out} for inspection")


def _echo_plan(data: dict[str, Any]) -> None:
    """The dry-run plan for people."""
    click.echo(f"plan: {data['operation']} into {data['base']}")
    for a in data["adapters"]:
        click.echo(f"  adapter {a['source']} ({a['method']}, weight {a['weight']})")
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


class QuantType(click.ParamType):
    """A registered backend that can quantize dense weights (nf4, fp4, ...)."""

    name = "quant_type"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        names = sorted(n for n, e in registry.backends().items()
                       if type(e.obj).quantize_settings is not Backend.quantize_settings)
        if value not in names:
            self.fail(f"{value!r} is not one of {', '.join(names)}", param, ctx)
        return str(value)


@cli.command()
@click.argument("dense")
@click.argument("out", type=click.Path())
@click.option("--quant-type", type=QuantType(), default="nf4", show_default=True,
              help="A backend that quantizes (see `adaptools plugins`).")
@click.option("--blocksize", type=click.Choice(["32", "64", "128", "256", "512", "1024", "2048", "4096"]),
              default="64", show_default=True, help="Elements per absmax block (transformers always uses 64).")
@click.option("--double-quant/--no-double-quant", default=True, show_default=True,
              help="Quantize the absmax values too (bnb_4bit_use_double_quant).")
@click.option("--skip-modules", default="", help="Comma-separated module names to keep dense (besides "
              "lm_head, embeddings and norms, which always stay dense).")
@force_option
@json_option
def requantize(dense: str, out: str, quant_type: str, blocksize: str, double_quant: bool, skip_modules: str,
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
    quantize = QuantizeOptions(quant_type=quant_type, blocksize=int(blocksize), double_quant=double_quant,
                               skip_modules=tuple(filter(None, (m.strip() for m in skip_modules.split(",")))))
    options = MergeOptions(force=force, quantize=quantize, operation="requantize", command=command_line())
    _report(_run(dense, [], out, options, "quantizing", json_), json_)

