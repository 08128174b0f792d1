"""Write outputs so that nothing is ever half-written, silently overwritten, or lost.

Every operation writes into a hidden temporary sibling of its output and renames it into place only when
everything succeeded (docs/outputs.md). The rules:

- An existing output is replaced only with ``force=True``, and only if adaptools wrote it (an output
  container recognises it or a file directly inside it as its own: ``OutputContainer.owns``) or it is an
  empty folder; never an input, never a folder that holds an input (the inputs a command passes, and every
  path the running command reads: :mod:`adaptools.inputs`), never a symbolic link.
- The replacement is atomic where the kernel allows (``renameat2(RENAME_EXCHANGE)``): the output path
  always holds either the old output or the new one.
- A temporary sibling is named after its writer's PID and locked (``flock``) while it is written; every
  run removes stale ones whose writer is gone, whatever killed it.
- SIGTERM, SIGHUP and SIGQUIT are handled like Ctrl-C; once an interruption has begun cleaning up, more
  signals are ignored until the clean-up is done.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import AdaptoolsError, InputError, OutputExistsError
from .inputs import read_paths

if TYPE_CHECKING:
    from .backend import OutputContainer

TEMP_MARKER = ".adaptools-tmp-"
#: Signals that stop a run the way Ctrl-C does (with clean-up).
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT") if hasattr(signal, n))


class OutputError(AdaptoolsError):
    """The output cannot be written (permissions, disk full, a file in the way)."""


class Interrupted(KeyboardInterrupt):
    """A stop signal (SIGTERM, SIGHUP, SIGQUIT) turned into the exception Ctrl-C raises."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_interrupted = False


def _raise_interrupted(signum: int, frame: Any) -> None:
    """The first stop signal raises; every later one is ignored, so clean-up cannot be cut short."""
    global _interrupted
    _interrupted = True
    ignore_stop_signals()
    if signum == signal.SIGINT:
        raise KeyboardInterrupt()
    raise Interrupted(signum)


@contextmanager
def stop_signals_raise() -> Iterator[None]:
    """For the duration, SIGTERM/SIGHUP/SIGQUIT raise :class:`Interrupted`, as SIGINT raises
    KeyboardInterrupt, so that ``finally`` clean-up runs. Outside the main thread it does nothing. After
    an interruption the signals stay ignored: the process is ending."""
    try:
        previous = {s: signal.signal(s, _raise_interrupted) for s in STOP_SIGNALS}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        if not _interrupted:
            for s, handler in previous.items():
                signal.signal(s, handler)


@contextmanager
def shielded() -> Iterator[None]:
    """Ignore stop signals while a clean-up runs, so that a second Ctrl-C cannot cut it short."""
    try:
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in STOP_SIGNALS}
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def ignore_stop_signals() -> None:
    """From now on ignore stop signals: the run is already ending after an interruption, and a second
    Ctrl-C must not turn its one-line message into a traceback."""
    for s in STOP_SIGNALS:
        try:
            signal.signal(s, signal.SIG_IGN)
        except ValueError:  # not the main thread
            return


def is_ours(path: Path) -> bool:
    """True if adaptools wrote ``path``: a file some output container owns (its format's metadata carries
    adaptools' keys), or a folder holding such a file directly (among its files that end in a container's
    ``file_suffix``). Links are never ours."""
    if path.is_symlink():
        return False
    from .engine.containers import containers  # late: the containers come from the plugins

    owners = list(containers().values())
    if path.is_dir():
        suffixes = {c.file_suffix for c in owners if c.file_suffix}
        return any(_file_is_ours(p, owners) for p in path.iterdir() if p.suffix in suffixes)
    return _file_is_ours(path, owners)


def _file_is_ours(path: Path, owners: Sequence[OutputContainer]) -> bool:
    if path.is_symlink() or not path.is_file():
        return False
    return any(container.owns(path) for container in owners)


def _refuse_replacing(path: Path, inputs: Sequence[str | os.PathLike[str]]) -> None:
    """Raise unless ``--force`` may replace ``path``."""
    resolved = path.resolve()
    for item in (*inputs, *read_paths()):
        source = Path(item).expanduser()
        if not source.exists():
            continue
        source = source.resolve()
        if resolved == source or resolved in source.parents:
            raise OutputExistsError("the output is an input of this command, or a folder that holds one; "
                                    "--force never replaces inputs", path=path, hint="choose another output path")
    if path.is_symlink():
        raise OutputExistsError("the output is a symbolic link; --force does not replace links", path=path,
                                hint="remove the link yourself or choose another path")
    if path.is_dir() and not any(path.iterdir()):
        return
    if not is_ours(path):
        raise OutputExistsError("the output exists and was not written by adaptools; --force replaces only "
                                "adaptools' own outputs", path=path, hint="remove it yourself or choose another path")


#: Suffixes of one-file weights and adapters in the formats the core itself reads: a folder output never ends in
#: one (check_output).
FILE_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".ckpt"})


def check_output(path: str | os.PathLike[str], force: bool, inputs: Sequence[str | os.PathLike[str]] = (),
                 directory: bool | None = None) -> Path:
    """Refuse early (before any work) what the final rename would refuse, and a folder output named like a
    file (``lora.safetensors`` written as a PEFT folder is a folder no loader opens as the file its name says)."""
    path = Path(path)
    if directory and path.suffix.lower() in FILE_SUFFIXES:
        raise InputError(f"this output is a folder, but its name ends in {path.suffix}, a file's suffix", path=path,
                         hint="name a folder without that suffix, or choose a format that writes one file "
                              "(`adaptools plugins` lists the formats)")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError("the output's parent folder does not exist", path=parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError("cannot write in the output's parent folder (permission denied)", path=parent)
    if path.exists() or path.is_symlink():
        if not force:
            raise OutputExistsError("output already exists", path=path, hint="choose another path or pass --force")
        _refuse_replacing(path, inputs)
        if directory is not None and path.is_dir() != directory:
            kinds = ("a file", "a folder")
            raise OutputExistsError(f"the output is {kinds[path.is_dir()]}; this command writes {kinds[directory]}",
                                    path=path, hint="choose another path")
    return path


def _writer_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(parent: Path) -> list[Path]:
    """Remove temporary siblings in ``parent`` whose writer is gone (unlocked, and its PID not running)."""
    removed: list[Path] = []
    try:
        candidates = [p for p in parent.iterdir() if p.name.startswith(".") and TEMP_MARKER in p.name]
    except OSError:
        return removed
    for path in candidates:
        try:
            pid = int(path.name.split(TEMP_MARKER, 1)[1].split("-", 1)[0])
        except ValueError:
            continue
        # A live PID is left alone even when unlocked (a writer starting up, or a reused PID): removing
        # what another run is writing would be worse than leaving a stale folder one more time.
        if pid == os.getpid() or _writer_alive(pid) or not _unlocked(path):
            continue
        _remove(path)
        removed.append(path)
    return removed


def _unlocked(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        try:
            path.unlink()
        except OSError:
            pass


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _publish(tmp: Path, final: Path, force: bool, inputs: Sequence[str | os.PathLike[str]]) -> None:
    if final.exists() or final.is_symlink():
        if not force:  # appeared while we worked
            raise OutputExistsError("output appeared while writing", path=final, hint="pass --force")
        _refuse_replacing(final, inputs)
        if _exchange(tmp, final):
            _remove(tmp)  # the old output, now under the temporary name
            return
        trash = final.parent / f".{final.name}{TEMP_MARKER}{os.getpid()}-old"
        os.replace(final, trash)
        os.replace(tmp, final)
        _remove(trash)
    else:
        os.rename(tmp, final)


@contextmanager
def atomic_output(path: str | os.PathLike[str], *, force: bool = False, directory: bool = True,
                  inputs: Sequence[str | os.PathLike[str]] = (), parts: Sequence[str] = ()) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it to ``path``, on failure delete it.

    Args:
        path: the final output (a folder when ``directory`` is true, else a file).
        force: replace an existing output that adaptools wrote.
        directory: create the temporary path as an empty folder (else yield a non-existent file path).
        inputs: paths this run reads; the output may never replace them or a folder holding them.
        parts: a one-file output written as several files instead (a split model): their names, first to
            last, written beside the yielded path (in its folder) and each moved beside ``path``; the first
            is moved last, so that a reader opening the set by its first part finds every other part there.

    Raises:
        OutputExistsError: the output exists and may not be replaced.
        OutputError: the output could not be written (permission denied, disk full), naming the path.
    """
    final = check_output(path, force, inputs, directory) if not parts else Path(path)
    published = [check_output(final.parent / name, force, inputs, False) for name in parts] or [final]
    remove_stale(final.parent)
    try:
        tmp_root = Path(tempfile.mkdtemp(prefix=f".{final.name}{TEMP_MARKER}{os.getpid()}-", dir=final.parent))
    except OSError as exc:
        raise OutputError(f"cannot write: {exc.strerror or exc}", path=final.parent) from None
    lock = os.open(tmp_root, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_root, 0o777 & ~umask)  # mkdtemp makes it private; outputs get the usual permissions
        tmp = tmp_root if directory else tmp_root / final.name
        with stop_signals_raise():
            try:
                yield tmp
                for target in reversed(published):
                    _publish(tmp_root / target.name if parts else tmp, target, force, inputs)
            except OSError as exc:
                writing = exc.filename is None or str(exc.filename).startswith(str(tmp_root))
                raise OutputError(f"cannot {'write' if writing else 'read'}: {exc.strerror or exc}",
                                  path=final if writing else exc.filename,
                                  hint="free some space or choose another output" if exc.errno in (
                                      errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else None) from None
    finally:
        with shielded():
            _remove(tmp_root)
            os.close(lock)
