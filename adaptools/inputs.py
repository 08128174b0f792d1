"""What the running command reads, for the rule that ``--force`` never replaces an input (docs/outputs.md).

Every path a command reads counts, however it was named: its arguments, ``--base``, ``--original-base``,
``--initial``, a validator's ``--eval-text``, an option a plugin's command declares. The CLI records them
all once, before the command runs (:func:`reading`, from every parameter value that names an existing
path); :func:`adaptools.outputs.check_output` and the final rename add them to the inputs the command
passes itself, so a command or container written later inherits the rule without listing its inputs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

_READ: ContextVar[tuple[Path, ...]] = ContextVar("adaptools_read_paths", default=())


def read_paths() -> tuple[Path, ...]:
    """The paths the running command reads, as recorded by :func:`reading` (empty outside one)."""
    return _READ.get()


@contextmanager
def reading(paths: Iterable[str | os.PathLike[str]]) -> Iterator[None]:
    """Record ``paths`` (those that exist) as read for the duration."""
    found = []
    for item in paths:
        try:
            path = Path(item).expanduser()
            if path.exists():
                found.append(path)
        except (OSError, ValueError):  # a name too long for the system, a NUL byte: not a path we read
            continue
    token = _READ.set((*_READ.get(), *found))
    try:
        yield
    finally:
        _READ.reset(token)
