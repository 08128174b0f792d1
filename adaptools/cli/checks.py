"""``--check NAME`` on the commands that run validators, with the options each validator declares.

A validator lists its options (:class:`adaptools.ValidatorOption`); every option can be given as
``--check-option NAME=VALUE`` (or ``VALIDATOR.NAME=VALUE``), and one that declares a ``flag`` also gets
that flag on ``merge`` and ``check`` (``--eval-text``). The values are converted and range-checked
here, so a validator receives typed options and nothing is written when one is wrong.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from .. import registry
from ..engine import CheckRequest
from ..interfaces import ValidatorOption

#: The commands that take ``--check`` (their validator flags are added when plugins have loaded).
CHECK_COMMANDS = ("merge", "unmerge", "swap", "check")


def check_options(f: Any) -> Any:
    f = click.option("--check-option", "check_option_pairs", multiple=True, metavar="NAME=VALUE",
                     help="An option for a validator given with --check (see `adaptools plugins`).")(f)
    return click.option("--check", "checks", multiple=True, metavar="NAME",
                        help="Run a registered validator on the output before it is published; exit 1 if it "
                             "fails (see `adaptools plugins`).")(f)


def _declared() -> dict[str, list[tuple[str, ValidatorOption]]]:
    """Flag -> (validator, option) for every validator option with a flag of its own."""
    flags: dict[str, list[tuple[str, ValidatorOption]]] = {}
    for name, entry in registry.validators().items():
        for option in entry.obj.options:
            if option.flag:
                flags.setdefault(option.flag, []).append((name, option))
    return flags


def add_validator_flags(group: click.Group) -> None:
    """Give ``merge`` and ``check`` the flags the installed validators declare."""
    for flag, owners in _declared().items():
        dest = "checkflag_" + flag.lstrip("-").replace("-", "_")
        names = ", ".join(sorted({v for v, _ in owners}))
        option = owners[0][1]
        for command_name in CHECK_COMMANDS:
            command = group.commands.get(command_name)
            if command is None or any(p.name == dest for p in command.params):
                continue
            default = f" (default {option.default})" if option.default is not None else ""
            command.params.append(click.Option([flag, dest], default=None, metavar=option.type.__name__.upper(),
                                               help=f"{option.help}{default} [--check {names}]"))


def _convert(validator: str, option: ValidatorOption, raw: Any) -> Any:
    where = f"--check-option {validator}.{option.name}" if not option.flag else option.flag
    try:
        if option.type is bool:
            text = str(raw).lower()
            if text not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return text in ("1", "true", "yes")
        value = option.type(raw)
    except (TypeError, ValueError):
        raise click.BadParameter(f"{raw!r} is not a {option.type.__name__}", param_hint=where) from None
    if isinstance(value, float) and not math.isfinite(value):
        raise click.BadParameter(f"{raw!r} is not a finite number", param_hint=where)
    if option.minimum is not None and isinstance(value, (int, float)) and value < option.minimum:
        raise click.BadParameter(f"{raw} must be at least {option.minimum}", param_hint=where)
    return str(value) if isinstance(value, Path) else value


def check_requests(checks: Sequence[str], pairs: Sequence[str], flags: Mapping[str, Any]) -> tuple[CheckRequest, ...]:
    """Typed, validated :class:`CheckRequest` s from the command line."""
    given: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not NAME=VALUE", param_hint="--check-option")
        given[key.strip()] = value
    requests = []
    known: set[str] = set()
    for name in checks:
        validator = registry.get_validator(name)
        options: dict[str, Any] = {}
        for option in validator.options:
            known |= {option.name, f"{name}.{option.name}"}
            dest = "checkflag_" + (option.flag or "").lstrip("-").replace("-", "_")
            raw = given.get(f"{name}.{option.name}", given.get(option.name, flags.get(dest)))
            options[option.name] = option.default if raw is None else _convert(name, option, raw)
        requests.append(CheckRequest(name, options))
    unknown = sorted(set(given) - known)
    if unknown:
        raise click.BadParameter(f"no validator given with --check takes {', '.join(unknown)}",
                                 param_hint="--check-option")
    stray = [k for k, v in flags.items() if k.startswith("checkflag_") and v is not None
             and not any(k == "checkflag_" + (o.flag or "").lstrip("-").replace("-", "_")
                         for n in checks for o in registry.get_validator(n).options)]
    if stray:
        raise click.UsageError(f"--{stray[0][len('checkflag_'):].replace('_', '-')} is an option of a validator "
                               "not given with --check")
    return tuple(requests)
