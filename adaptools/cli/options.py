"""Options and value types every command shares, declared once. Plugins that add commands use them too
(docs/plugins.md, "Commands"), so ``--force`` means the same thing everywhere.

The types refuse what would otherwise surface later as garbage or a traceback: NaN and infinite
numbers, ranks of zero, shares outside (0, 1], shard sizes that are not a positive number of bytes.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from ..float_types import DTYPE_CHOICES

F = Callable[..., Any]

if TYPE_CHECKING:  # click >= 8.3 types ParamType by its value; older versions cannot subscript it at runtime
    ParamType = click.ParamType[Any]
else:
    ParamType = click.ParamType


def command_line() -> str:
    """The command as the user typed it, for provenance records."""
    return " ".join(["adaptools", *sys.argv[1:]])


class FiniteFloat(ParamType):
    """A float that is finite, optionally within [minimum, maximum] (or (minimum, ...] when open)."""

    name = "number"

    def __init__(self, minimum: float | None = None, maximum: float | None = None, min_open: bool = False):
        self.minimum, self.maximum, self.min_open = minimum, maximum, min_open

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        low = self.minimum
        if low is not None and (number < low or (self.min_open and number == low)):
            self.fail(f"{value} must be {'above' if self.min_open else 'at least'} {low}", param, ctx)
        if self.maximum is not None and number > self.maximum:
            self.fail(f"{value} must be at most {self.maximum}", param, ctx)
        return number


class ByteSize(ParamType):
    """'5GB', '500MB', '2GiB' or a byte count, as a positive integer number of bytes."""

    name = "size"
    UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
             "GIB": 2**30, "TIB": 2**40}

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            number, unit = float(value), ""
        else:
            raw = str(value).strip().upper()
            digits = raw.rstrip("KMGTIB")
            number, unit = float("nan"), raw[len(digits):]
            try:
                number = float(digits)
            except ValueError:
                pass
        if unit not in self.UNITS or not math.isfinite(number) or number <= 0:
            self.fail(f"{value!r} is not a positive size like 5GB or 500MB", param, ctx)
        size = int(number * self.UNITS[unit])
        if size <= 0:
            self.fail(f"{value!r} is less than one byte", param, ctx)
        return size


class Device(ParamType):
    """cpu, cuda or cuda:N."""

    name = "device"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        kind, _, index = text.partition(":")
        if kind == "cpu" and not index or kind == "cuda" and (not index or index.isdigit()):
            return text
        self.fail(f"{text!r} is not cpu, cuda or cuda:N", param, ctx)


#: Ranks, counts and sizes of one or more.
POSITIVE_INT = click.IntRange(min=1)
#: A share of something: more than 0, at most 1.
SHARE = FiniteFloat(0.0, 1.0, min_open=True)
FINITE = FiniteFloat()


def force_option(f: F) -> F:
    return click.option("--force", is_flag=True,
                        help="Replace OUT if adaptools wrote it (never an input or anything else).")(f)


def allow_pickle_option(f: F) -> F:
    return click.option("--allow-pickle", is_flag=True,
                        help="Allow pickled .bin weights (read with torch.load(weights_only=True)).")(f)


def json_option(f: F) -> F:
    return click.option("json_", "--json", is_flag=True, help="Print the result as JSON (for machines).")(f)


def dtype_option(help: str) -> Callable[[F], F]:
    return click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="auto", show_default=True, help=help)


def shard_size_option(f: F) -> F:
    return click.option("--shard-size", type=ByteSize(),
                        help="Re-shard the output (e.g. 5GB); default keeps the base's shard layout. A one-file "
                             "output whose format splits (GGUF) is written as parts OUT-00001-of-0000N.")(f)


def adapter_format_option(default: str) -> Callable[[F], F]:
    return click.option("--to", "to", default=default, show_default=True,
                        help="Output format (see `adaptools plugins`: schema, peft, ...).")
