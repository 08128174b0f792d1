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
from typing import Any

import click

from . import registry
from .adapter_io import load
from .errors import AdaptoolsError
from .interfaces import OPERATIONS
from .operations import convert as convert_op
from .operations import describe
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
              help="Output format: schema (one .safetensors) or peft (a directory).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--allow-pickle", is_flag=True, help="Allow adapter_model.bin (read with weights_only=True).")
@json_option
def convert(adapter: str, out: str, to: str, force: bool, allow_pickle: bool, json_: bool) -> None:
    """Convert ADAPTER to another format, losslessly, and write it to OUT.

    The output is written beside OUT under a temporary name and renamed into
    place only when complete; an existing OUT is kept unless --force is given.

    \b
    Examples:
      adaptools convert ./my-lora my-lora.safetensors
      adaptools convert my-lora.safetensors ./my-lora-peft --to peft
    """
    registry.get_format(to)  # unknown format: fail before reading anything
    path = convert_op(adapter, out, to=to, force=force, allow_pickle=allow_pickle)
    if json_:
        emit_json({"input": adapter, "output": str(path), "format": to})
    else:
        click.echo(f"wrote {path} ({to})")


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
    if json_:
        emit_json({"plugins": list(rows.values()), "operations": matrix})
        return
    for row in rows.values():
        dist = f"{row['distribution']} {row['version'] or ''}".strip() if row["distribution"] else "-"
        provides = "; ".join(f"{k}: {', '.join(row[k])}" for k in ("methods", "formats", "backends", "validators")
                             if row[k])
        click.echo(f"{row['name']}  ({dist})  {provides or 'commands only'}")
    click.echo("")
    click.echo("method".ljust(12) + "".join(op.ljust(9) for op in OPERATIONS))
    for name, ops in matrix.items():
        click.echo(name.ljust(12) + "".join(("yes" if op in ops else "-").ljust(9) for op in OPERATIONS))


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
