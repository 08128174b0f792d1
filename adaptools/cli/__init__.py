"""The ``adaptools`` command line. Thin: parse, call one library function, format the result.

Commands live by what they work on: ``adapter_commands`` (info, convert, check, diff, combine, resize),
``model_commands`` (merge, dequantize, requantize), ``plugin_commands``; ``group`` holds the click group,
``options`` the shared options and value types, ``checks`` the ``--check`` options validators declare.
Plugins add their own commands (LoRA: init, extract; perplexity: eval) through ``register_commands``.

Exit codes: 0 success, 1 a check that ran and failed, 2 unusable input or usage. A user mistake prints one
``Error: ...`` line naming the file and tensor; ``--debug`` (or ``ADAPTOOLS_RAISE_ERRORS=1``) shows the
traceback instead.
"""

from __future__ import annotations

import click

from ..plugins import load_plugins, pm
from . import adapter_commands, model_commands, plugin_commands, quant_commands  # noqa: F401  (importing them registers them)
from .checks import add_validator_flags
from .group import cli, emit_json, json_option

__all__ = ["cli", "emit_json", "get_cli", "json_option", "main"]

_commands_registered = False


def get_cli() -> click.Group:
    """The CLI with plugin commands added (done once, after plugins are loaded)."""
    global _commands_registered
    if not _commands_registered:
        _commands_registered = True
        load_plugins()
        pm.hook.register_commands(cli=cli)
        add_validator_flags(cli)
    return cli


def main() -> None:
    """Console-script entry point."""
    get_cli()(prog_name="adaptools")


if __name__ == "__main__":  # pragma: no cover
    main()
