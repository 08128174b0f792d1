"""The ``adaptools`` command line. Thin: parse, call one library function, format the result.

Exit codes: 0 success, 1 a check that ran and failed, 2 unusable input or usage. A user mistake prints one
``Error: ...`` line naming the file and tensor; ``--debug`` (or ``ADAPTOOLS_RAISE_ERRORS=1``) shows the
traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from . import registry
from .adapter_io import load
from .errors import AdaptoolsError, CheckFailedError, InputError
from .interfaces import OPERATIONS, ValidationContext
from .operations import convert as convert_op
from .operations import describe
from .operations.merge import MergeEvent, MergeInput
from .operations.merge import merge as merge_op
from .operations.quantized import QuantizeOptions
from .plugins import load_plugins, pm
from .version import __version__


class AdaptoolsGroup(click.Group):
    """A click group that turns AdaptoolsError into one line on stderr and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AdaptoolsError as exc:
            if ctx.params.get("debug") or os.environ.get("ADAPTOOLS_RAISE_ERRORS"):
                raise
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("Interrupted: nothing was written.", err=True)
            ctx.exit(130)


def json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("json_", "--json", is_flag=True, help="Print the result as JSON (for machines).")(f)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group(cls=AdaptoolsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="adaptools")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    """Read, check, merge, convert and compare fine-tuning adapters (LoRA and friends) as files.

    ADAPTER arguments accept a PEFT adapter directory, an adaptools schema file
    (.safetensors), or a hub reference such as org/name or org/name@revision
    (resolved through the huggingface-hub cache; HF_HUB_OFFLINE=1 is honoured).

    \b
    Examples:
      adaptools info ./my-lora
      adaptools convert ./my-lora my-lora.safetensors --to schema
      adaptools plugins
    """


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


@cli.command()
@click.argument("adapter")
@click.option("--tensors", "show_tensors", is_flag=True, help="List every tensor with dtype and shape.")
@click.option("--allow-pickle", is_flag=True, help="Allow adapter_model.bin (read with weights_only=True).")
@json_option
def info(adapter: str, show_tensors: bool, allow_pickle: bool, json_: bool) -> None:
    """Describe an adapter: method, base model, size and configuration.

    The adapter is fully validated (tensors against config, NaN/Inf), so a
    clean `info` also means the adapter is readable and consistent.

    \b
    Example:
      adaptools info ./outputs/checkpoint-500
      adaptools info my-lora.safetensors --json
    """
    data = describe(load(adapter, allow_pickle=allow_pickle))
    if json_:
        emit_json(data)
        return
    base = data["base"]
    click.echo(f"adapter:    {data['source']}")
    click.echo(f"format:     {data['format']}   method: {data['method']}   schema v{data['schema_version']}")
    revision = f" @ {base['revision']}" if base.get("revision") else ""
    click.echo(f"base:       {base.get('name') or '(not recorded)'}{revision}")
    dtypes = ", ".join(sorted(data["dtypes"]))
    click.echo(f"size:       {data['parameters']:,} parameters in {len(data['tensors'])} tensors "
               f"({_fmt_bytes(data['bytes'])}, {dtypes})")
    click.echo(f"modules:    {data['modules']}")
    for key, value in data["summary"].items():
        if value in (None, [], {}, False):
            continue
        click.echo(f"{key + ':':<11} {value}")
    if data["provenance"].get("named_adapters"):
        click.echo(f"also here:  named adapters {', '.join(data['provenance']['named_adapters'])} "
                   "(pass the subfolder to read one)")
    if show_tensors:
        for t in data["tensors"]:
            click.echo(f"  {t['name']}  {t['dtype']}  {t['shape']}")


@cli.command()
@click.argument("adapter")
@click.argument("out", type=click.Path())
@click.option("--to", "to", default="schema", show_default=True,
              help="Output format (schema: one .safetensors; peft, adapterhub: a directory), or a method to "
                   "convert to (lora: an OLoRA/PiSSA adapter as plain LoRA on the original base).")
@click.option("--base", help="With --to lora: the original base, to recompute the initial factors.")
@click.option("--initial", help="With --to lora: the adapter saved right after init (instead of --base).")
@click.option("--format", "out_format", default="peft", show_default=True,
              help="With --to METHOD: the output format (peft or schema).")
@click.option("--bake-projection", "bake", is_flag=True,
              help="Prefix tuning: evaluate a stored projection MLP once into the plain prefix PEFT saves.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--allow-pickle", is_flag=True, help="Allow adapter_model.bin (read with weights_only=True).")
@json_option
def convert(adapter: str, out: str, to: str, base: str | None, initial: str | None, out_format: str, bake: bool,
            force: bool, allow_pickle: bool, json_: bool) -> None:
    """Convert ADAPTER to another format, losslessly, and write it to OUT.

    The output is written beside OUT under a temporary name and renamed into
    place only when complete; an existing OUT is kept unless --force is given.

    \b
    Examples:
      adaptools convert ./my-lora my-lora.safetensors
      adaptools convert my-lora.safetensors ./my-lora-peft --to peft
      adaptools convert ./olora-trained ./plain-lora --to lora --base ./base
      adaptools convert ./prefix-checkpoint ./prefix --to peft --bake-projection
      adaptools convert ./adapterhub-adapter houlsby.safetensors
    """
    if to in registry.methods():
        from .operations.convert import convert_method

        path = convert_method(adapter, out, base=base, initial=initial, to_format=out_format, force=force,
                              allow_pickle=allow_pickle)
    else:
        registry.get_format(to)  # unknown format: fail before reading anything
        path = convert_op(adapter, out, to=to, force=force, allow_pickle=allow_pickle, bake=bake)
    if json_:
        emit_json({"input": adapter, "output": str(path), "format": to})
    else:
        click.echo(f"wrote {path} ({to})")


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
@json_option
def merge(paths: tuple[str, ...], weights: tuple[float, ...], dtype: str, device: str, shard_size: str | None,
          force: bool, checks: tuple[str, ...], ignore_base_mismatch: bool, allow_pickle: bool, hash_base: bool,
          requantize: bool, merge_base: str, original_base: str | None, initials: tuple[str, ...],
          eval_text: str | None, max_tokens: int, ppl_tolerance: float, json_: bool) -> None:
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
    --ppl-tolerance (the output is kept, marked failed in adaptools_checks.json).

    \b
    Examples:
      adaptools merge meta-llama/Llama-3.2-1B ./my-lora ./merged
      adaptools merge ./base ./style ./facts ./out --weight 0.7 --weight 1
      adaptools merge ./base ./my-lora ./out --dtype bf16 --shard-size 5GB
    """
    if len(paths) < 3:
        raise click.UsageError("give BASE, at least one ADAPTER, and OUT")
    base, adapter_refs, out = paths[0], paths[1:-1], paths[-1]
    if weights and len(weights) != len(adapter_refs):
        raise click.UsageError(f"{len(weights)} --weight values for {len(adapter_refs)} adapters")
    validators = [registry.get_validator(name) for name in checks]
    size = parse_size(shard_size)
    inputs = [MergeInput(load(ref, allow_pickle=allow_pickle), weights[i] if weights else 1.0)
              for i, ref in enumerate(adapter_refs)]
    if initials:
        if len(initials) != len(inputs):
            raise click.UsageError(f"{len(initials)} --initial values for {len(inputs)} adapters")
        for item, initial in zip(inputs, initials):
            method = registry.get_method(item.adapter.method)
            item.adapter = method.to_plain(item.adapter, None, None, load(initial, allow_pickle=allow_pickle))
    bar = _Progress(enabled=not json_, label="merging")
    command = " ".join(["adaptools", *sys.argv[1:]])
    quantize = None
    if merge_base == "original":
        if not original_base:
            raise click.UsageError("--merge-base original needs --original-base PATH (the 16-bit checkpoint)")
        quantize = quantize_options_of(base) if requantize else None
        base, requantize = original_base, False
    elif original_base:
        raise click.UsageError("--original-base is only used with --merge-base original")
    summary = merge_op(base, inputs, out, dtype=dtype, device=device, shard_size=size, force=force,
                       ignore_base_mismatch=ignore_base_mismatch, hash_base=hash_base, command=command,
                       progress=bar, requantize=requantize, quantize=quantize)
    bar.close()
    verdicts = []
    options = {"eval_text": eval_text, "max_tokens": max_tokens, "tolerance": ppl_tolerance,
               "weights": [i.weight for i in inputs]}
    for validator in validators:
        context = ValidationContext("merge", base, [i.adapter for i in inputs], str(out), options)
        verdicts.append((validator.name, validator.validate(context)))
    if verdicts:
        record_checks(out, verdicts)
    result = summary.to_json()
    result["checks"] = [{"name": n, "passed": v.passed, "message": v.message, "figures": v.figures}
                        for n, v in verdicts]
    _report_survival(summary.survival, quiet=json_)
    if json_:
        emit_json(result)
    else:
        click.echo(f"wrote {summary.output}: {summary.tensors} tensors in {summary.shards} shard(s), "
                   f"{summary.tensors_merged} merged, {summary.tensors_copied} copied byte for byte, "
                   f"{_fmt_bytes(summary.bytes_written)} in {summary.seconds:.1f} s, "
                   f"peak memory {_fmt_bytes(summary.peak_rss_bytes)}")
        if summary.untied_lm_head:
            click.echo("note: lm_head now differs from the input embedding; written explicitly and "
                       "tie_word_embeddings set to false")
        for name, verdict in verdicts:
            click.echo(f"check {name}: {'passed' if verdict.passed else 'FAILED'}: {verdict.message}")
    if any(not v.passed for _, v in verdicts):
        raise CheckFailedError(f"a check failed; the output is kept at {out} for inspection")


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
    summary = merge_op(base, [], out, dtype=dtype, shard_size=parse_size(shard_size), force=force,
                       command=" ".join(["adaptools", *sys.argv[1:]]), operation="dequantize", progress=bar)
    bar.close()
    if json_:
        emit_json(summary.to_json())
    else:
        click.echo(f"wrote {summary.output}: {summary.tensors} tensors in {summary.shards} shard(s), "
                   f"{_fmt_bytes(summary.bytes_written)} in {summary.seconds:.1f} s, "
                   f"peak memory {_fmt_bytes(summary.peak_rss_bytes)}")


def record_checks(out: str, verdicts: list[tuple[str, Any]]) -> None:
    """Write the verdicts beside the output (adaptools_checks.json) and flag a failure in its model card."""
    folder = Path(out)
    data = [{"name": n, "passed": v.passed, "message": v.message, "figures": v.figures} for n, v in verdicts]
    (folder / "adaptools_checks.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    failed = [d for d in data if not d["passed"]]
    if failed and (folder / "README.md").exists():
        with open(folder / "README.md", "a", encoding="utf-8") as card:
            for d in failed:
                card.write(f"\n**CHECK FAILED: {d['name']}**: {d['message']}\n")


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
    from .checkpoint import Checkpoint

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
    summary = merge_op(dense, [], out, force=force, quantize=options, operation="requantize",
                       command=" ".join(["adaptools", *sys.argv[1:]]), progress=bar)
    bar.close()
    if json_:
        emit_json(summary.to_json())
    else:
        click.echo(f"wrote {summary.output}: {summary.tensors} tensors in {summary.shards} shard(s), "
                   f"{_fmt_bytes(summary.bytes_written)} in {summary.seconds:.1f} s")


@cli.command()
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER [ADAPTER ...]")
@click.option("--base", help="Check every target against this base (config and safetensors headers only).")
@click.option("--fail-on", type=click.Choice(["error", "warning", "info"]), default="error", show_default=True,
              help="Exit 1 when a finding of this severity or worse is found.")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "sarif", "junit"]), default="text",
              show_default=True, help="Report format (sarif for code scanning, junit for CI test reports).")
@click.option("--allow-pickle", is_flag=True, help="Read adapter_model.bin (with weights_only=True) to inspect it.")
@click.option("--check", "checks", multiple=True, metavar="NAME",
              help="Also run a validator that needs --base (e.g. perplexity, with --eval-text).")
@click.option("--eval-text", metavar="FILE", help="Evaluation text for --check perplexity.")
def check(adapters: tuple[str, ...], base: str | None, fail_on: str, fmt: str, allow_pickle: bool,
          checks: tuple[str, ...], eval_text: str | None) -> None:
    """Lint adapters before they are published (for CI jobs and pre-commit).

    Every finding names a rule id, a severity, the file and tensor or config
    field, and a one-line fix. With --base, every target module is checked
    against the base's config.json and safetensors headers; its weights are
    never downloaded or read. Exit code: 0 clean, 1 findings at or above
    --fail-on, 2 unusable input. ADAPTER may also be a path to an
    adapter_config.json (as pre-commit passes it).

    \b
    Examples:
      adaptools check ./my-lora --base meta-llama/Llama-3.2-1B
      adaptools check ./my-lora --format sarif > adaptools.sarif
    """
    from .operations import check as check_op

    reports = [check_op.check(a, base=base, allow_pickle=allow_pickle) for a in dict.fromkeys(
        str(Path(a).parent) if a.endswith(("adapter_config.json", "adapter_model.safetensors")) else a
        for a in adapters)]
    failed_checks = []
    if checks:
        if not base:
            raise click.UsageError("--check needs --base")
        import tempfile

        for report in reports:
            adapter = load(report.adapter, allow_pickle=allow_pickle)
            with tempfile.TemporaryDirectory() as tmp:
                merged = Path(tmp) / "merged"
                merge_op(base, [MergeInput(adapter)], merged)
                for name in checks:
                    verdict = registry.get_validator(name).validate(ValidationContext(
                        "check", base, [adapter], str(merged), {"eval_text": eval_text}))
                    if not verdict.passed:
                        failed_checks.append(f"{report.adapter}: check {name} failed: {verdict.message}")
    if fmt == "json":
        emit_json(check_op.to_json(reports))
    elif fmt == "sarif":
        emit_json(check_op.to_sarif(reports))
    elif fmt == "junit":
        click.echo(check_op.to_junit(reports, fail_on))
    else:
        for report in reports:
            for f in report.findings:
                where = f.tensor or f.field
                click.echo(f"{f.path}: {where + ': ' if where else ''}{f.rule} {f.severity}: {f.message} "
                           f"(fix: {f.fix})")
            click.echo(f"{report.adapter}: {len(report.findings)} finding(s)")
    for line in failed_checks:
        click.echo(line, err=True)
    if any(r.at_or_above(fail_on) for r in reports) or failed_checks:
        sys.exit(1)


@cli.command()
@click.argument("a")
@click.argument("b")
@click.argument("tuned", required=False)
@click.option("--allow-pickle", is_flag=True, help="Allow adapter_model.bin (read with weights_only=True).")
@json_option
def diff(a: str, b: str, tuned: str | None, allow_pickle: bool, json_: bool) -> None:
    """Compare two adapters, two checkpoints, or an adapter against a fine-tune.

    \b
    adaptools diff ADAPTER_A ADAPTER_B      per module: |dA|, |dB|, |dA - dB|, relative, cosine,
                                            exactly from the factors; then config changes
                                            (bottleneck and prefix adapters: per tensor)
    adaptools diff CHECKPOINT_A CHECKPOINT_B   per tensor: max-abs and relative difference (streaming)
    adaptools diff ADAPTER BASE TUNED       per module: how much of (TUNED - BASE) the adapter explains

    Rows are sorted with the largest difference (or the least explained) first.
    """
    from .operations.algebra import diff as diff_op
    from .operations.extract import diff_checkpoints, explain

    def is_checkpoint(p: str) -> bool:
        return (Path(p) / "config.json").is_file() and not (Path(p) / "adapter_config.json").is_file()

    if tuned is not None:
        result = explain(load(a, allow_pickle=allow_pickle), b, tuned)
        if json_:
            emit_json(result)
            return
        click.echo(f"{'module':60s} {'explained':>10s} {'|change|':>10s} {'|residual|':>10s}")
        for m in result["modules"]:
            click.echo(f"{m['module']:60s} {m['explained']:10.4f} {m['change_norm']:10.4g} {m['residual_norm']:10.4g}")
        click.echo(f"overall: the adapter explains {result['explained']:.2%} of the fine-tune's change")
        return
    if is_checkpoint(a) and is_checkpoint(b):
        data = diff_checkpoints(a, b)
        if json_:
            emit_json(data)
            return
        click.echo(f"{'tensor':60s} {'max abs':>10s} {'relative':>10s}")
        for t in data["tensors"]:
            click.echo(f"{t['tensor']:60s} {t['max_abs']:10.4g} {t['relative']:10.4g}")
        for side in ("only_in_a", "only_in_b"):
            for name in data[side]:
                click.echo(f"{side.replace('_', ' ')}: {name}")
        return
    adapter_diff = diff_op(load(a, allow_pickle=allow_pickle), load(b, allow_pickle=allow_pickle))
    if json_:
        emit_json(adapter_diff.to_json())
        return
    click.echo(f"{'module':60s} {'|A|':>9s} {'|B|':>9s} {'|A-B|':>9s} {'rel':>8s} {'cos':>7s}")
    for m in adapter_diff.modules:
        cos = f"{m.cosine:7.4f}" if m.cosine is not None else "      -"
        click.echo(f"{m.module:60s} {m.norm_a:9.4g} {m.norm_b:9.4g} {m.difference:9.4g} {m.relative:8.3g} {cos}")
    for key, (va, vb) in adapter_diff.config.items():
        click.echo(f"config {key}: {va!r} -> {vb!r}")
    for key, (va, vb) in adapter_diff.shapes.items():
        click.echo(f"shape {key}: {va} -> {vb}")
    for side in ("only_in_a", "only_in_b"):
        for name in getattr(adapter_diff, side):
            click.echo(f"{side.replace('_', ' ')}: {name}")


@cli.command(name="init")
@click.argument("base")
@click.argument("out", type=click.Path())
@click.option("--method", "init", type=click.Choice(["olora", "pissa"]), default="olora", show_default=True,
              help="The initialisation (a LoRA whose factors start from the base's QR or SVD).")
@click.option("--rank", type=int, required=True, help="LoRA rank r.")
@click.option("--alpha", type=float, help="lora_alpha (default: the rank).")
@click.option("--targets", required=True, help="Comma-separated target modules (PEFT target_modules).")
@click.option("--write-base", metavar="DIR", help="Also write the residual base W - s·B0A0 that training uses.")
@click.option("--format", "out_format", default="peft", show_default=True, help="Output format: peft or schema.")
@click.option("--force", is_flag=True, help="Replace outputs that exist.")
def init_command(base: str, out: str, init: str, rank: int, alpha: float | None, targets: str,
                 write_base: str | None, out_format: str, force: bool) -> None:
    """Initialise an OLoRA (QR) or PiSSA (SVD) adapter from BASE, as PEFT would.

    These inits move the base's principal part into the adapter, so training
    runs on a residual base. PEFT recomputes it when it loads the adapter on
    the original base; --write-base writes it for other trainers. After
    training, `adaptools merge BASE ADAPTER OUT` recomputes the init on the fly,
    and `adaptools convert ADAPTER OUT --to lora --base BASE` gives a plain
    LoRA of rank 2r for the original base.

    \b
    Example:
      adaptools init ./llama ./olora-init --rank 16 --targets q_proj,v_proj
    """
    from .operations.convert import initialize

    options = {"init": init, "rank": rank, "alpha": alpha,
               "targets": [t.strip() for t in targets.split(",") if t.strip()]}
    path = initialize(base, out, method="lora", options=options, to_format=out_format, force=force,
                      write_base=write_base)
    click.echo(f"wrote {path}" + (f" and the residual base {write_base}" if write_base else ""))


@cli.command()
@click.argument("base")
@click.argument("tuned")
@click.argument("out", type=click.Path())
@click.option("--rank", type=int, help="Rank of every extracted module.")
@click.option("--energy", type=float, help="Per module, the smallest rank keeping this share of ‖ΔW‖².")
@click.option("--max-rank", type=int, default=256, show_default=True, help="Cap for --energy.")
@click.option("--to", default="peft", show_default=True, help="Output format: peft or schema.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@json_option
def extract(base: str, tuned: str, out: str, rank: int | None, energy: float | None, max_rank: int, to: str,
            force: bool, json_: bool) -> None:
    """Extract a LoRA from the difference of two checkpoints (TUNED - BASE).

    Streams one weight at a time; each linear weight's change is factored by a
    seeded randomized SVD; changed embeddings, heads, norms and biases are
    saved whole (modules_to_save). Reports the share of each change kept.

    \b
    Example:
      adaptools extract ./llama-base ./llama-finetuned ./extracted-lora --rank 32
    """
    from .operations.extract import extract as extract_op
    from .outputs import check_output

    check_output(out, force)
    result = extract_op(base, tuned, rank=rank, energy=energy, max_rank=max_rank)
    _write_adapter(result.adapter, out, to, force)
    if json_:
        emit_json({"output": out, "retained_energy": result.retained, "modules_to_save": result.full_tensors})
    else:
        worst = min(result.retained.values()) if result.retained else 1.0
        click.echo(f"wrote {out}: {len(result.retained)} low-rank modules (lowest retained energy {worst:.1%}), "
                   f"{len(result.full_tensors)} full tensors")


def _write_adapter(adapter: Any, out: str, to: str, force: bool) -> None:
    from .adapter_io import save

    save(adapter, out, format=to, force=force)


@cli.command()
@click.argument("paths", nargs=-1, required=True, metavar="ADAPTER [ADAPTER ...] OUT")
@click.option("--how", type=click.Choice(["cat", "linear", "svd", "ties", "dare"]), default="cat", show_default=True,
              help="cat: exact (rank adds up); svd: exact sum truncated to --rank; linear: PEFT's approximation; "
                   "ties/dare: TIES or DARE on each module's full delta, then truncated to --rank.")
@click.option("--density", type=float, default=0.5, show_default=True, help="Share of entries kept by ties/dare.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed for dare.")
@click.option("--weight", "weights", type=float, multiple=True, help="Weight of each adapter, in order.")
@click.option("--rank", type=int, help="Target rank for --how svd (default: the largest input rank).")
@click.option("--to", default="schema", show_default=True, help="Output format: schema or peft.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--allow-pickle", is_flag=True, help="Allow adapter_model.bin (read with weights_only=True).")
def combine(paths: tuple[str, ...], how: str, density: float, seed: int, weights: tuple[float, ...],
            rank: int | None, to: str, force: bool, allow_pickle: bool) -> None:
    """Combine adapters into one: the weighted sum of their deltas.

    Unlike PEFT's add_weighted_adapter, the result is right for rsLoRA and
    rank/alpha patterns (each module's scaling is folded in; the output uses
    scale 1), and weights (1, 0) give back the first adapter exactly. DoRA
    and lora_bias are refused: their deltas are not low-rank products.

    \b
    Example:
      adaptools combine ./style ./facts combined.safetensors --weight 0.5 --weight 1
    """
    from .operations.algebra import combine as combine_op
    from .outputs import check_output

    if len(paths) < 3:
        raise click.UsageError("give at least two ADAPTERs and OUT")
    check_output(paths[-1], force)
    adapters = [load(p, allow_pickle=allow_pickle) for p in paths[:-1]]
    _write_adapter(combine_op(adapters, weights or None, how, rank, density, seed), paths[-1], to, force)
    click.echo(f"wrote {paths[-1]} ({how} of {len(adapters)} adapters)")


@cli.command()
@click.argument("adapter")
@click.argument("out", type=click.Path())
@click.option("--rank", type=int, help="Keep this many singular directions per module.")
@click.option("--energy", type=float, help="Keep the smallest rank holding this share of each module's ‖ΔW‖².")
@click.option("--to", default="schema", show_default=True, help="Output format: schema or peft.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@json_option
def resize(adapter: str, out: str, rank: int | None, energy: float | None, to: str, force: bool,
           json_: bool) -> None:
    """Change an adapter's rank by truncated SVD of each module's delta.

    \b
    Example:
      adaptools resize ./my-lora-r64 my-lora-r16.safetensors --rank 16
      adaptools resize ./my-lora-r64 my-lora-small.safetensors --energy 0.9
    """
    from .operations.algebra import resize as resize_op
    from .outputs import check_output

    check_output(out, force)
    result, retained = resize_op(load(adapter), rank=rank, energy=energy)
    _write_adapter(result, out, to, force)
    if json_:
        emit_json({"output": out, "retained_energy": retained})
    else:
        worst = min(retained.values()) if retained else 1.0
        click.echo(f"wrote {out}: {len(retained)} modules, lowest retained energy {worst:.1%}")


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


@cli.command()
@json_option
def plugins(json_: bool) -> None:
    """List loaded plugins, what each provides, and the operations of each method."""
    load_plugins()
    rows: dict[str, dict[str, Any]] = {}
    kinds = {"methods": registry.methods(), "formats": registry.formats(), "backends": registry.backends(),
             "validators": registry.validators()}
    for kind, entries in kinds.items():
        for name, entry in entries.items():
            row = rows.setdefault(entry.plugin, {"name": entry.plugin, "distribution": entry.distribution,
                                                 "version": entry.version, "methods": [], "formats": [],
                                                 "backends": [], "validators": []})
            row[kind].append(name)
    for plugin in pm.get_plugins():
        name = pm.get_name(plugin) or repr(plugin)
        rows.setdefault(name, {"name": name, "distribution": None, "version": None, "methods": [],
                               "formats": [], "backends": [], "validators": []})
    matrix = {name: sorted(e.obj.operations) for name, e in kinds["methods"].items()}
    conditional = {name: dict(e.obj.conditional) for name, e in kinds["methods"].items() if e.obj.conditional}
    if json_:
        emit_json({"plugins": list(rows.values()), "operations": matrix, "conditional": conditional})
        return
    for row in rows.values():
        dist = f"{row['distribution']} {row['version'] or ''}".strip() if row["distribution"] else "-"
        provides = "; ".join(f"{k}: {', '.join(row[k])}" for k in ("methods", "formats", "backends", "validators")
                             if row[k])
        click.echo(f"{row['name']}  ({dist})  {provides or 'commands only'}")
    click.echo("")
    click.echo("method".ljust(15) + "".join(op.ljust(9) for op in OPERATIONS))
    for name, ops in matrix.items():
        marks = ["some" if op in conditional.get(name, {}) else "yes" if op in ops else "-" for op in OPERATIONS]
        click.echo(name.ljust(15) + "".join(mark.ljust(9) for mark in marks))
    for name, ops in conditional.items():
        for op, when in ops.items():
            click.echo(f"  {name} {op}: {when}")


_commands_registered = False


def get_cli() -> click.Group:
    """The CLI with plugin commands added (done once, after plugins are loaded)."""
    global _commands_registered
    if not _commands_registered:
        _commands_registered = True
        load_plugins()
        pm.hook.register_commands(cli=cli)
    return cli


def main() -> None:
    """Console-script entry point."""
    get_cli()(prog_name="adaptools")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
