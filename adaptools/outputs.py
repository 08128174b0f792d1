"""Write outputs so that nothing is ever half-written or silently overwritten.

Every operation writes into a hidden temporary sibling of its output and renames it into place only when
everything succeeded. An existing output is replaced only with ``force=True``. If the process is
interrupted, the temporary sibling is removed (Ctrl-C, SIGTERM) or left hidden and unnamed (SIGKILL), and the
output path itself never holds a partial result.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import InputError, OutputExistsError

TEMP_MARKER = ".adaptools-tmp-"


def check_output(path: str | os.PathLike[str], force: bool) -> Path:
    """Refuse early (before any work) when ``path`` exists and ``force`` is not set."""
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError("output already exists", path=path, hint="choose another path or pass --force")
    if not path.parent.exists():
        raise InputError("the output's parent directory does not exist", path=path.parent)
    return path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_output(path: str | os.PathLike[str], *, force: bool = False, directory: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it to ``path``, on failure delete it.

    Args:
        path: the final output (a directory when ``directory`` is true, else a file).
        force: replace an existing output.
        directory: create the temporary path as an empty directory (else yield a non-existent file path).
    """
    final = check_output(path, force)
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{final.name}{TEMP_MARKER}", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_root, 0o777 & ~umask)  # mkdtemp makes it private; outputs get the usual permissions
    tmp = tmp_root if directory else tmp_root / final.name
    try:
        yield tmp
        if final.exists() or final.is_symlink():
            if not force:  # appeared while we worked
                raise OutputExistsError("output appeared while writing", path=final, hint="pass --force")
            trash = final.parent / f".{final.name}{TEMP_MARKER}old-{os.getpid()}"
            os.replace(final, trash)
            os.replace(tmp, final)
            _remove(trash)
        else:
            os.replace(tmp, final)
    finally:
        _remove(tmp_root)


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM so that cleanup runs as for Ctrl-C."""


@contextmanager
def terminate_as_exception() -> Iterator[None]:
    """Turn SIGTERM into an exception for the duration, so ``atomic_output`` can clean up."""

    def handler(signum: int, frame: Any) -> None:
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
