"""The ``adaptools`` click group, its error handling and the helpers every command shares."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import click

from ..errors import AdaptoolsError
from ..version import __version__


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

    ADAPTER arguments accept a PEFT adapter directory, an AdapterHub (adapters
    library) directory, an adaptools schema file (.safetensors), or a hub
    reference such as org/name or org/name@revision (resolved through the
    huggingface-hub cache; HF_HUB_OFFLINE=1 is honoured).

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
