"""Commands on adapters: info, convert, check, diff, combine, resize."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from .. import registry
from ..adapter_io import load
from ..errors import printable
from ..operations import convert as convert_op
from ..operations import describe
from .checks import check_options, check_requests
from .group import _fmt_bytes, cli, emit_json
from .options import FINITE, POSITIVE_INT, SHARE, allow_pickle_option, force_option, json_option


@cli.command()
@click.argument("adapter")
@click.option("--tensors", "show_tensors", is_flag=True, help="List every tensor with dtype and shape.")
@allow_pickle_option
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
    click.echo(printable(f"adapter:    {data['source']}"))
    click.echo(printable(f"format:     {data['format']}   method: {data['method']}   schema v{data['schema_version']}"))
    revision = f" @ {base['revision']}" if base.get("revision") else ""
    click.echo(printable(f"base:       {base.get('name') or '(not recorded)'}{revision}"))
    dtypes = ", ".join(sorted(data["dtypes"]))
    click.echo(printable(f"size:       {data['parameters']:,} parameters in {len(data['tensors'])} tensors "
               f"({_fmt_bytes(data['bytes'])}, {dtypes})"))
    click.echo(printable(f"modules:    {data['modules']}"))
    for key, value in data["summary"].items():
        if value in (None, [], {}, False):
            continue
        click.echo(printable(f"{key + ':':<11} {value}"))
    if data["provenance"].get("named_adapters"):
        click.echo(printable(f"also here:  named adapters {', '.join(data['provenance']['named_adapters'])} "
                   "(pass the subfolder to read one)"))
    if show_tensors:
        for t in data["tensors"]:
            click.echo(printable(f"  {t['name']}  {t['dtype']}  {t['shape']}"))


@cli.command()
@click.argument("adapter")
@click.argument("out", type=click.Path())
@click.option("--to", "to", default="schema", show_default=True,
              help="Output format (schema: one .safetensors; peft, adapterhub: a directory; gguf: a llama.cpp LoRA "
                   "file, needs --base; kohya, diffusers, bfl: an image-model LoRA .safetensors), or a method to "
                   "convert to (lora: an OLoRA/PiSSA adapter as plain LoRA on the original base; AdaLoRA, LoHa and "
                   "LoKr adapters as plain LoRA).")
@click.option("--base", help="With --to lora: the original base, to recompute the initial factors. With --to gguf: "
                             "the base the adapter is for (folder with config.json, or a .gguf), which gives the "
                             "architecture; reading a GGUF LoRA: its head counts, if the file lacks them.")
@click.option("--outtype", help="For formats that store several types: the tensors' type (gguf: f32, f16, bf16 or "
                                "q8_0; default f32).")
@click.option("--initial", help="With --to lora: the adapter saved right after init (instead of --base).")
@click.option("--rank", type=POSITIVE_INT, help="With --to METHOD: truncate each module to this rank by SVD.")
@click.option("--energy", type=SHARE,
              help="With --to METHOD: per module, the smallest rank keeping this share of ‖ΔW‖².")
@click.option("--format", "out_format",
              help="With --to METHOD: the output format (default: the format ADAPTER was read from).")
@click.option("--bake-projection", "bake", is_flag=True,
              help="Evaluate training-time parts once into what is served (prefix tuning's projection MLP, "
                   "P-tuning's prompt encoder), as PEFT saves them.")
@force_option
@allow_pickle_option
@json_option
def convert(adapter: str, out: str, to: str, base: str | None, outtype: str | None, initial: str | None,
            rank: int | None, energy: float | None, out_format: str, bake: bool, force: bool, allow_pickle: bool,
            json_: bool) -> None:
    """Convert ADAPTER to another format, losslessly, and write it to OUT.

    The output is written beside OUT under a temporary name and renamed into
    place only when complete; an existing OUT is kept unless --force is given.

    \b
    Examples:
      adaptools convert ./my-lora my-lora.safetensors
      adaptools convert my-lora.safetensors ./my-lora-peft --to peft
      adaptools convert ./olora-trained ./plain-lora --to lora --base ./base
      adaptools convert ./loha-adapter ./lora-r16 --to lora --rank 16
      adaptools convert ./prefix-checkpoint ./prefix --to peft --bake-projection
      adaptools convert ./adapterhub-adapter houlsby.safetensors
      adaptools convert ./my-lora my-lora.gguf --to gguf --base ./base --outtype f16
      adaptools convert my-lora.gguf ./my-lora-peft --to peft
    """
    retained = None
    if to in registry.methods():
        from ..operations.convert import convert_method

        path, retained = convert_method(adapter, out, base=base, initial=initial, to_format=out_format, force=force,
                                        allow_pickle=allow_pickle, to_method=to, rank=rank, energy=energy)
    else:
        if rank is not None or energy is not None:
            raise click.UsageError("--rank and --energy go with --to METHOD (e.g. --to lora)")
        registry.get_format(to)  # unknown format: fail before reading anything
        path = convert_op(adapter, out, to=to, force=force, allow_pickle=allow_pickle, bake=bake, base=base,
                          outtype=outtype)
    if json_:
        emit_json({"input": adapter, "output": str(path), "format": to,
                   **({"retained_energy": retained} if retained is not None else {})})
    else:
        worst = f", lowest retained energy {min(retained.values()):.1%}" if retained else ""
        click.echo(f"wrote {path} ({to}{worst})")


@cli.command()
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER [ADAPTER ...]")
@click.option("--base", help="Check every target against this base (config and safetensors headers only).")
@click.option("--fail-on", type=click.Choice(["error", "warning", "info"]), default="error", show_default=True,
              help="Exit 1 when a finding of this severity or worse is found.")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "sarif", "junit"]), default="text",
              show_default=True, help="Report format (sarif for code scanning, junit for CI test reports).")
@allow_pickle_option
@check_options
def check(adapters: tuple[str, ...], base: str | None, fail_on: str, fmt: str, allow_pickle: bool,
          checks: tuple[str, ...], check_option_pairs: tuple[str, ...], **check_flags: Any) -> None:
    """Lint adapters before they are published (for CI jobs and pre-commit).

    Every finding names a rule id, a severity, the file and tensor or config
    field, and a one-line fix. With --base, every target module is checked
    against the base's config.json and safetensors headers; its weights are
    never downloaded or read. Exit code: 0 clean, 1 findings at or above
    --fail-on, 2 unusable input. ADAPTER may also be a path to an
    adapter_config.json (as pre-commit passes it).

    --check NAME (with --base) merges into a temporary folder and runs the
    validator: --check logits also fails an adapter that does not change the
    base's outputs at all (lora_B = 0, alpha 0) or makes them non-finite.

    \b
    Examples:
      adaptools check ./my-lora --base meta-llama/Llama-3.2-1B
      adaptools check ./my-lora --format sarif > adaptools.sarif
      adaptools check ./my-lora --base ./base --check logits --check generate
    """
    from ..operations import check as check_op

    requests = check_requests(checks, check_option_pairs, check_flags)
    if requests and not base:
        raise click.UsageError("--check needs --base")
    reports = [check_op.check(a, base=base, allow_pickle=allow_pickle) for a in dict.fromkeys(
        str(Path(a).parent) if a.endswith(("adapter_config.json", "adapter_model.safetensors")) else a
        for a in adapters)]
    failed_checks = []
    for report in reports if requests else []:
        for verdict in check_op.run_validators(report.adapter, base, requests, allow_pickle=allow_pickle):  # type: ignore[arg-type]
            if not verdict["passed"]:
                failed_checks.append(f"{report.adapter}: check {verdict['name']} failed: {verdict['message']}")
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
                click.echo(printable(f"{f.path}: {where + ': ' if where else ''}{f.rule} {f.severity}: {f.message} "
                                     f"(fix: {f.fix})"))
            click.echo(f"{report.adapter}: {len(report.findings)} finding(s)")
    for line in failed_checks:
        click.echo(line, err=True)
    if any(r.at_or_above(fail_on) for r in reports) or failed_checks:
        sys.exit(1)


@cli.command()
@click.argument("a")
@click.argument("b")
@click.argument("tuned", required=False)
@allow_pickle_option
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
    from ..operations.algebra import diff as diff_op
    from ..operations.extract import diff_checkpoints, explain

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


def _write_adapter(adapter: Any, out: str, to: str, force: bool) -> None:
    from ..adapter_io import save

    save(adapter, out, format=to, force=force)


@cli.command()
@click.argument("paths", nargs=-1, required=True, metavar="ADAPTER [ADAPTER ...] OUT")
@click.option("--how", type=click.Choice(["cat", "linear", "svd", "ties", "dare"]), default="cat", show_default=True,
              help="cat: exact (rank adds up); svd: exact sum truncated to --rank; linear: PEFT's approximation; "
                   "ties/dare: TIES or DARE on each module's full delta, then truncated to --rank.")
@click.option("--density", type=SHARE, default=0.5, show_default=True, help="Share of entries kept by ties/dare.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed for dare.")
@click.option("--weight", "weights", type=FINITE, multiple=True, help="Weight of each adapter, in order.")
@click.option("--rank", type=POSITIVE_INT, help="Target rank for --how svd (default: the largest input rank).")
@click.option("--to", default="schema", show_default=True,
              help="Output format: schema, peft, or an image-model key style (kohya, diffusers).")
@force_option
@allow_pickle_option
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
    from ..operations.algebra import combine as combine_op
    from ..outputs import check_output

    if len(paths) < 3:
        raise click.UsageError("give at least two ADAPTERs and OUT")
    check_output(paths[-1], force, list(paths[:-1]))
    adapters = [load(p, allow_pickle=allow_pickle) for p in paths[:-1]]
    _write_adapter(combine_op(adapters, weights or None, how, rank, density, seed), paths[-1], to, force)
    click.echo(f"wrote {paths[-1]} ({how} of {len(adapters)} adapters)")


@cli.command()
@click.argument("adapter")
@click.argument("out", type=click.Path())
@click.option("--rank", type=POSITIVE_INT, help="Keep this many singular directions per module.")
@click.option("--energy", type=SHARE, help="Keep the smallest rank holding this share of each module's ‖ΔW‖².")
@click.option("--to", default="schema", show_default=True,
              help="Output format: schema, peft, or an image-model key style (kohya, diffusers).")
@force_option
@json_option
def resize(adapter: str, out: str, rank: int | None, energy: float | None, to: str, force: bool,
           json_: bool) -> None:
    """Change an adapter's rank by truncated SVD of each module's delta.

    \b
    Example:
      adaptools resize ./my-lora-r64 my-lora-r16.safetensors --rank 16
      adaptools resize ./my-lora-r64 my-lora-small.safetensors --energy 0.9
    """
    from ..operations.algebra import resize as resize_op
    from ..outputs import check_output

    check_output(out, force, [adapter])
    result, retained = resize_op(load(adapter), rank=rank, energy=energy)
    _write_adapter(result, out, to, force)
    if json_:
        emit_json({"output": out, "retained_energy": retained})
    else:
        worst = min(retained.values()) if retained else 1.0
        click.echo(f"wrote {out}: {len(retained)} modules, lowest retained energy {worst:.1%}")
