"""The ``adaptools`` click group, its error handling and the helpers every command shares."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import click

from ..errors import AdaptoolsError, printable
from ..inputs import reading
from ..outputs import Interrupted, ignore_stop_signals
from ..version import __version__


class AdaptoolsGroup(click.Group):
    """A click group that turns anything a user or a file can cause into one line on stderr and an exit
    code: AdaptoolsError (its own code), a usage error or an operating-system error (2), an interruption
    (128 + signal)."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # `adaptools` alone: the help, as click shows it
                exc.show()
                sys.exit(exc.exit_code)
            where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            click.echo(f"Error: {printable(exc.format_message())}{where}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"Error: {printable(exc.format_message())}", err=True)
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            ignore_stop_signals()
            click.echo("Interrupted (SIGINT): nothing was written.", err=True)
            sys.exit(128 + signal.SIGINT)
        sys.exit(code if isinstance(code, int) else 0)

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        """Every command, ours or a plugin's, runs with the paths it reads recorded (adaptools.inputs), so
        that ``--force`` can never replace one of them."""
        original = cmd.invoke

        def invoke(ctx: click.Context) -> Any:
            with reading(read_by(ctx)):
                return original(ctx)

        cmd.invoke = invoke  # type: ignore[method-assign]
        super().add_command(cmd, name)

    def invoke(self, ctx: click.Context) -> Any:
        debug = ctx.params.get("debug") or os.environ.get("ADAPTOOLS_RAISE_ERRORS")
        try:
            return super().invoke(ctx)
        except AdaptoolsError as exc:
            if debug:
                raise
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt as exc:
            ignore_stop_signals()
            signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
            click.echo(f"Interrupted ({signal.Signals(signum).name}): nothing was written.", err=True)
            ctx.exit(128 + signum)
        except BrokenPipeError:  # `adaptools ... | head`: the reader has gone, nothing to report to
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            ctx.exit(1)
        except OSError as exc:
            if debug:
                raise
            where = f"{printable(str(exc.filename))}: " if exc.filename else ""
            click.echo(f"Error: {where}{exc.strerror or exc}", err=True)
            ctx.exit(2)


def read_by(ctx: click.Context) -> list[str]:
    """Every parameter value of the command that may name a path it reads: all but its output, which is
    the parameter ``out`` or the last of a variadic ``... OUT`` argument. ``NAME=VALUE`` options
    (``--check-option eval_text=FILE``) count by their value. Which of them exist is for
    :func:`adaptools.inputs.reading` to find."""
    values: list[str] = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name or "")
        if param.name == "out" or value is None or isinstance(value, bool):
            continue
        items = list(value) if isinstance(value, (tuple, list)) else [value]
        if isinstance(param, click.Argument) and param.nargs == -1 and (param.metavar or "").endswith("OUT"):
            items = items[:-1]
        for item in items:
            if isinstance(item, (str, os.PathLike)):
                values.append(os.fspath(item))
                if isinstance(item, str) and "=" in item:
                    values.append(item.split("=", 1)[1])
    return values


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
