"""Errors a user can act on.

Every error adaptools raises for a user mistake is an :class:`AdaptoolsError`. It carries the exit code
the CLI returns (2 for unusable input, 1 for a check that ran and failed) and, where known, the file and
the tensor concerned, so that the message alone tells the user what to fix.
"""

from __future__ import annotations

import re


def printable(text: object) -> str:
    """``text`` with every character a terminal could act on escaped (``\\n``, ``\\x1b``, ``\\ud800``).

    Names come from files (tensor keys, config fields, paths): a name holding a newline or an escape
    sequence must not rewrite what the user's terminal shows, nor split a one-line error. Printable
    characters, non-ASCII letters included, are kept as they are.
    """
    text = str(text)
    if not text.isprintable():
        text = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
    return clip_long_words(text)


#: A run of non-space characters longer than this (a name from a hostile file) is shortened in messages.
MAX_WORD = 300


def clip_long_words(text: str, limit: int = MAX_WORD) -> str:
    """Shorten each run of non-space characters longer than ``limit`` to its head and tail, saying how
    long it was, so that a 100,000-character tensor name cannot turn a one-line error into a page while the
    line still shows where the name starts and ends."""
    if len(text) <= limit:
        return text
    return _LONG_WORD.sub(lambda m: f"{m.group()[:limit // 2]}…[{len(m.group())} characters]…"
                                    f"{m.group()[-limit // 5:]}", text)


_LONG_WORD = re.compile(rf"\S{{{MAX_WORD + 1},}}")


class AdaptoolsError(Exception):
    """Base class: a problem the user can fix. The CLI prints ``str(error)`` on one line."""

    exit_code = 2

    def __init__(self, message: str, *, path: object = None, tensor: str | None = None, hint: str | None = None):
        self.message = message
        self.path = str(path) if path is not None else None
        self.tensor = tensor
        self.hint = hint
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.path:
            where.append(self.path)
        if self.tensor:
            where.append(f"tensor {self.tensor!r}")
        text = f"{': '.join(where)}: {self.message}" if where else self.message
        if self.hint:
            text += f" ({self.hint})"
        return printable(text)


class InputError(AdaptoolsError):
    """An input file or directory is missing, unreadable, corrupt or not what it claims to be."""


class AdapterFormatError(InputError):
    """An adapter's files were read but do not describe a consistent adapter (tensors against config)."""


class UnsafeInputError(InputError):
    """Reading the input would unpickle data; refused unless the user allows it."""


class UnknownPluginError(AdaptoolsError):
    """No method, backend, format or validator of that name is registered."""


class PluginConflictError(AdaptoolsError):
    """Two plugins registered the same name."""


class UnsupportedOperationError(AdaptoolsError):
    """A method or format cannot do what was asked (e.g. merge a prefix-tuning adapter)."""


class IncompatibleBaseError(AdaptoolsError):
    """The adapter does not fit the base model (missing module, shape mismatch, other architecture)."""


class OutputExistsError(AdaptoolsError):
    """The output path exists and ``--force`` was not given."""


class CheckFailedError(AdaptoolsError):
    """A check ran and found a problem; the CLI exits 1."""

    exit_code = 1


class PluginContractError(AdaptoolsError):
    """A plugin does not keep the contract: it claims an operation it does not implement, registers an
    object of the wrong kind, or returns malformed data. The message names the plugin."""
