"""Commands on models: merge, dequantize, requantize, eval."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from .. import registry
from ..adapter_io import load
from ..engine import CheckRequest, MergeEvent, MergeInput, MergeOptions, QuantizeOptions, execute
from ..engine import plan as plan_merge
from ..errors import CheckFailedError, InputError
from ..outputs import check_output
from .group import _fmt_bytes, cli, emit_json, json_option


def parse_size(text: str | None) -> int | None:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    if text is None:
        return None
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    raw = text.strip().upper()
    number = raw.rstrip("KMGIB")
    try:
        return int(float(number) * units[raw[len(number):]])
    except (ValueError, KeyError):
        raise click.BadParameter(f"{text!r} is not a size like 5GB or 500MB", param_hint="--shard-size") from None


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


@cli.command()
@click.argument("paths", nargs=-1, required=True, metavar="BASE ADAPTER [ADAPTER ...] OUT")
@click.option("--weight", "weights", type=float, multiple=True,
              help="Weight of each adapter's delta, once per adapter in order (default 1).")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True,
              help="Output dtype; auto keeps the base's.")
@click.option("--device", default="cpu", show_default=True, help="Where the fp32 arithmetic runs: cpu or cuda.")
@click.option("--shard-size", help="Re-shard the output (e.g. 5GB); default keeps the base's shard layout.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--check", "checks", multiple=True, metavar="NAME",
              help="Run a registered validator on the result (see `adaptools plugins`); exit 1 if it fails.")
@click.option("--ignore-base-mismatch", is_flag=True,
              help="Merge even if the adapter says it was trained on another architecture.")
@click.option("--allow-pickle", is_flag=True, help="Allow adapter_model.bin (read with weights_only=True).")
@click.option("--hash-base", is_flag=True, help="Record the sha256 of local base shards (an extra full read).")
@click.option("--requantize", is_flag=True,
              help="4-bit base only: write 4-bit again (same settings; untouched layers copied byte for byte) "
                   "and report how much of each change survived.")
@click.option("--merge-base", type=click.Choice(["quantized", "original"]), default="quantized", show_default=True,
              help="4-bit base only: land the delta on dequant(W4), what QLoRA trained against, or on the "
                   "original 16-bit weights given by --original-base.")
@click.option("--original-base", metavar="PATH", help="The 16-bit checkpoint the 4-bit base was made from.")
@click.option("--initial", "initials", multiple=True, metavar="PATH",
              help="For an OLoRA/PiSSA-style adapter whose init cannot be recomputed: the adapter saved right "
                   "after init (once per adapter, in order).")
@click.option("--eval-text", metavar="FILE", help="Evaluation text for --check perplexity (.txt or .jsonl).")
@click.option("--max-tokens", type=int, default=20_000, show_default=True, help="Tokens of --eval-text to score.")
@click.option("--ppl-tolerance", type=float, default=0.005, show_default=True,
              help="--check perplexity passes when merged and unmerged perplexity differ by at most this share.")
@click.option("--dry-run", is_flag=True,
              help="Print the plan (what would be merged, cast, copied, untied, resized, written) and exit.")
@json_option
def merge(paths: tuple[str, ...], weights: tuple[float, ...], dtype: str, device: str, shard_size: str | None,
          force: bool, checks: tuple[str, ...], ignore_base_mismatch: bool, allow_pickle: bool, hash_base: bool,
          requantize: bool, merge_base: str, original_base: str | None, initials: tuple[str, ...],
          eval_text: str | None, max_tokens: int, ppl_tolerance: float, dry_run: bool, json_: bool) -> None:
    """Merge one or more adapters into BASE and write a full checkpoint to OUT.

    BASE is a Hugging Face checkpoint folder (model.safetensors, or shards
    with an index) or a hub reference. The merge streams one tensor at a
    time: memory stays near the largest tensor, whatever the model size.
    Deltas are computed in fp32 and rounded once to the output dtype, which
    gives PEFT's merge_and_unload bit for bit.

    Tied embeddings stay tied unless the adapter changes them differently;
    then an explicit lm_head.weight is written and tie_word_embeddings set
    to false, so the merged model behaves like the unmerged one.

    A bitsandbytes 4-bit BASE (QLoRA) is dequantized and merged into a dense
    model in the quant state's dtype: the faithful result. --requantize writes
    4-bit again and warns how much of the fine-tune the rounding erased.

    --check perplexity --eval-text FILE then proves the merge kept the
    fine-tune: it compares the merged model's perplexity with the base plus
    the adapter applied unmerged, and exits 1 if they differ by more than
    --ppl-tolerance. Checks run before OUT is published; a failed one keeps
    OUT, with the verdict in adaptools_checks.json and its model card.

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
    check_options = {"eval_text": eval_text, "max_tokens": max_tokens, "tolerance": ppl_tolerance}
    quantize = None
    if merge_base == "original":
        if not original_base:
            raise click.UsageError("--merge-base original needs --original-base PATH (the 16-bit checkpoint)")
        quantize = quantize_options_of(base) if requantize else None
        base, requantize = original_base, False
    elif original_base:
        raise click.UsageError("--original-base is only used with --merge-base original")
    options = MergeOptions(dtype=dtype, device=device, shard_size=parse_size(shard_size), force=force,
                           ignore_base_mismatch=ignore_base_mismatch, hash_base=hash_base,
                           command=" ".join(["adaptools", *sys.argv[1:]]), requantize=requantize, quantize=quantize,
                           checks=tuple(CheckRequest(name, check_options) for name in checks))
    if not dry_run:
        check_output(out, force, [base, *adapter_refs])
    inputs = [MergeInput(load(ref, allow_pickle=allow_pickle), weights[i] if weights else 1.0)
              for i, ref in enumerate(adapter_refs)]
    if initials:
        if len(initials) != len(inputs):
            raise click.UsageError(f"{len(initials)} --initial values for {len(inputs)} adapters")
        for item, initial in zip(inputs, initials):
            method = registry.get_method(item.adapter.method)
            item.adapter = method.to_plain(item.adapter, None, None, load(initial, allow_pickle=allow_pickle))
    planned = plan_merge(base, inputs, options)
    if dry_run:
        data = planned.to_json()
        if json_:
            emit_json(data)
            return
        _echo_plan(data)
        return
    bar = _Progress(enabled=not json_, label="merging")
    summary = execute(planned, out, progress=bar)
    bar.close()
    _report_survival(summary.survival, quiet=json_)
    if json_:
        emit_json(summary.to_json())
    else:
        click.echo(f"wrote {summary.output}: {summary.tensors} tensors in {summary.shards} shard(s), "
                   f"{summary.tensors_merged} merged, {summary.tensors_copied} copied byte for byte, "
                   f"{_fmt_bytes(summary.bytes_written)} in {summary.seconds:.1f} s, "
                   f"peak memory {_fmt_bytes(summary.peak_rss_bytes)}")
        if summary.untied_lm_head:
            click.echo("note: lm_head now differs from the input embedding; written explicitly and "
                       "tie_word_embeddings set to false")
        for check in summary.checks:
            click.echo(f"check {check['name']}: {'passed' if check['passed'] else 'FAILED'}: {check['message']}")
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
    if data["config_changes"]:
        click.echo(f"config.json changes: {json.dumps(data['config_changes'], sort_keys=True)}")
    for shard in data["shards"]:
        approx = "~" if shard["estimated"] else ""
        click.echo(f"  {shard['file']}: {shard['tensors']} tensors, {approx}{_fmt_bytes(shard['bytes'])}")


@cli.command()
@click.argument("base")
@click.argument("out", type=click.Path())
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True,
              help="Output dtype; auto uses each weight's original dtype (from its quant state).")
@click.option("--shard-size", help="Re-shard the output (e.g. 5GB); default keeps the base's shard layout.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@json_option
def dequantize(base: str, out: str, dtype: str, shard_size: str | None, force: bool, json_: bool) -> None:
    """Turn a bitsandbytes 4-bit (NF4/FP4) checkpoint into a dense one.

    The output loads in transformers without bitsandbytes: quantization_config
    is removed and every 4-bit weight is decoded exactly as bitsandbytes
    decodes it (flat blocks, double quantization), one tensor at a time.

    \b
    Example:
      adaptools dequantize ./llama-3-8b-nf4 ./llama-3-8b-bf16
    """
    bar = _Progress(enabled=not json_, label="dequantizing")
    options = MergeOptions(dtype=dtype, shard_size=parse_size(shard_size), force=force,
                           command=" ".join(["adaptools", *sys.argv[1:]]), operation="dequantize")
    check_output(out, force, [base])
    summary = execute(plan_merge(base, [], options), out, progress=bar)
    bar.close()
    if json_:
        emit_json(summary.to_json())
    else:
        click.echo(f"wrote {summary.output}: {summary.tensors} tensors in {summary.shards} shard(s), "
                   f"{_fmt_bytes(summary.bytes_written)} in {summary.seconds:.1f} s, "
                   f"peak memory {_fmt_bytes(summary.peak_rss_bytes)}")


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
                   "adapter's change; the 4-bit model has largely lost the fine-tune. Merge without "
                   "--requantize for a faithful 16-bit model.", err=True)


def quantize_options_of(base: str) -> QuantizeOptions:
    """The 4-bit settings a transformers bitsandbytes checkpoint was made with (its quantization_config)."""
    from ..checkpoint import Checkpoint

    config = Checkpoint.open(base).config.get("quantization_config") or {}
    if config.get("quant_method") != "bitsandbytes" or not config.get("load_in_4bit"):
        raise InputError("the base is not a bitsandbytes 4-bit checkpoint", path=base)
    return QuantizeOptions(quant_type=config.get("bnb_4bit_quant_type", "nf4"),
                           double_quant=bool(config.get("bnb_4bit_use_double_quant")),
                           skip_modules=tuple(config.get("llm_int8_skip_modules") or ()))


@cli.command()
@click.argument("dense")
@click.argument("out", type=click.Path())
@click.option("--quant-type", type=click.Choice(["nf4", "fp4"]), default="nf4", show_default=True)
@click.option("--blocksize", type=click.Choice(["32", "64", "128", "256", "512", "1024", "2048", "4096"]),
              default="64", show_default=True, help="Elements per absmax block (transformers always uses 64).")
@click.option("--double-quant/--no-double-quant", default=True, show_default=True,
              help="Quantize the absmax values too (bnb_4bit_use_double_quant).")
@click.option("--skip-modules", default="", help="Comma-separated module names to keep dense (besides "
              "lm_head, embeddings and norms, which always stay dense).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@json_option
def requantize(dense: str, out: str, quant_type: str, blocksize: str, double_quant: bool, skip_modules: str,
               force: bool, json_: bool) -> None:
    """Quantize a dense checkpoint to bitsandbytes 4-bit, as transformers would.

    Linear weights become NF4 (or FP4) with bytes identical to bitsandbytes'
    own quantize_4bit; lm_head, embeddings and norms stay dense. The result
    loads with transformers' bitsandbytes integration (quantization_config
    is written). Quantizing costs accuracy; see `adaptools merge --help`.

    \b
    Example:
      adaptools requantize ./merged-bf16 ./merged-nf4
    """
    options = QuantizeOptions(quant_type=quant_type, blocksize=int(blocksize), double_quant=double_quant,
                              skip_modules=tuple(filter(None, (m.strip() for m in skip_modules.split(",")))))
    bar = _Progress(enabled=not json_, label="quantizing")
    check_output(out, force, [dense])
    merge_options = MergeOptions(force=force, quantize=options, operation="requantize",
                                 command=" ".join(["adaptools", *sys.argv[1:]]))
    summary = execute(plan_merge(dense, [], merge_options), out, progress=bar)
    bar.close()
    if json_:
        emit_json(summary.to_json())
    else:
        click.echo(f"wrote {summary.output}: {summary.tensors} tensors in {summary.shards} shard(s), "
                   f"{_fmt_bytes(summary.bytes_written)} in {summary.seconds:.1f} s")


@cli.command(name="eval")
@click.argument("model")
@click.option("--adapter", "adapters", multiple=True, help="Apply this adapter at runtime, unmerged (repeatable).")
@click.option("--eval-text", required=True, metavar="FILE", help="A .txt or .jsonl (text field) file.")
@click.option("--max-tokens", type=int, default=20_000, show_default=True, help="Tokens to score at most.")
@click.option("--window", type=int, default=256, show_default=True, help="Tokens per scoring window.")
@click.option("--allow-pickle", is_flag=True, help="Allow adapter_model.bin (read with weights_only=True).")
@json_option
def eval_command(model: str, adapters: tuple[str, ...], eval_text: str, max_tokens: int, window: int,
                 allow_pickle: bool, json_: bool) -> None:
    """Print the perplexity of MODEL (optionally with adapters) on an evaluation text.

    The text is tokenized with MODEL's tokenizer and scored in fixed,
    non-overlapping windows. Needs transformers (pip install 'adaptools[eval]').

    \b
    Example:
      adaptools eval ./merged --eval-text held-out.txt
      adaptools eval ./base --adapter ./my-lora --eval-text held-out.txt --json
      adaptools eval ./base --adapter ./my-prefix --eval-text held-out.txt   (prefix and bottleneck
                                       adapters, which cannot be merged, are scored this way)
    """
    validator = registry.get_validator("perplexity")
    evaluate = getattr(validator, "measure", None)
    if evaluate is None:
        raise InputError("the installed perplexity validator cannot measure a single model")
    loaded = [load(a, allow_pickle=allow_pickle) for a in adapters]
    ppl, tokens = evaluate(model, loaded, eval_text, max_tokens, window)
    if json_:
        emit_json({"model": model, "adapters": list(adapters), "perplexity": ppl, "tokens": tokens,
                   "window": window})
    else:
        click.echo(f"perplexity {ppl:.4f} over {tokens} tokens (windows of {window})")
