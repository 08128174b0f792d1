"""The one progress bar: on stderr, shown only on a terminal, so that logs, pipes and ``--json`` output stay
clean. The engine's byte counts (the CLI) and the validators' forward passes (plugins) both use it."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol


class Bar(Protocol):
    def update(self, n: int) -> None: ...


class _NoBar:
    def update(self, n: int) -> None:
        pass


@contextmanager
def progress_bar(total: int, label: str, *, enabled: bool = True) -> Iterator[Bar]:
    """A bar of ``total`` steps; ``update(n)`` advances it. Without a terminal (or with ``enabled`` false)
    the bar draws nothing."""
    if not (enabled and sys.stderr.isatty()):
        yield _NoBar()
        return
    import click

    with click.progressbar(length=max(total, 1), label=label, file=sys.stderr) as bar:
        yield bar


class LazyBar:
    """A bar whose total is known only at the first update (the engine reports its total bytes with each
    event): call it with ``(total, n)``; :meth:`close` ends it."""

    def __init__(self, label: str, *, enabled: bool = True):
        self.label, self.enabled = label, enabled
        self._context: Any = None
        self._bar: Bar | None = None

    def advance(self, total: int, n: int) -> None:
        if self._bar is None:
            self._context = progress_bar(total, self.label, enabled=self.enabled)
            self._bar = self._context.__enter__()
        self._bar.update(n)

    def close(self) -> None:
        if self._context is not None:
            self._context.__exit__(None, None, None)
            self._context = self._bar = None
