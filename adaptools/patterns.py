"""Regular expressions from config files, matched with a time limit.

PEFT configs hold regexes (``target_modules`` as a string, ``rank_pattern`` / ``alpha_pattern`` keys,
``exclude_modules``, ``layers_pattern``) that PEFT runs with Python's ``re``. A hostile or careless one
(``(a|a)*$``) backtracks for longer than the universe has left on a 41-character module name.

We match them with the ``regex`` package, which accepts ``re``'s syntax unchanged (its default ``V0``
mode is documented as compatible with ``re``) and takes a ``timeout`` per match. A linear-time engine
(google-re2) would also stop the hang, but it refuses lookarounds and backreferences that PEFT users do
write (``^(?!.*vision).*q_proj``), so the same config would mean something else, or nothing, here than in
PEFT. A timeout keeps PEFT's meaning for every pattern PEFT can run and refuses only the ones that would
hang (docs/input-validation.md).
"""

from __future__ import annotations

import functools
import time
from typing import Any

import regex

from .errors import InputError

#: Seconds one match may take; real patterns on real module names take microseconds.
MATCH_TIMEOUT = 0.1
#: CPU seconds one pattern may spend in slow matches (each over :data:`SLOW_MATCH`) in a process. Without it a
#: pattern that stays just under :data:`MATCH_TIMEOUT` on each of thousands of module names would run for
#: hours. Real patterns match in microseconds, so their matches never count, however long the process lives.
PATTERN_BUDGET = 1.0
SLOW_MATCH = 1e-3
#: Longest pattern accepted (characters).
MAX_PATTERN_LENGTH = 1000
#: Longest module or tensor name matched against a pattern (characters).
MAX_NAME_LENGTH = 1024


#: Patterns that already ran out of time once: refused at once after that, so a config whose regex
#: backtracks costs one timeout, not one per module.
_SLOW: set[str] = set()
#: Seconds each pattern has spent in slow matches so far (see :data:`PATTERN_BUDGET`).
_SPENT: dict[str, float] = {}


@functools.lru_cache(maxsize=4096)
def _compile(pattern: str) -> Any:
    return regex.compile(pattern, regex.V0)


def compile_pattern(pattern: object, *, field: str, path: object = None) -> Any:
    """Compile a config regex, or raise InputError naming the field (not a string, too long, invalid)."""
    if not isinstance(pattern, str):
        raise InputError(f"{field} holds {repr(pattern)[:60]}, not a regular expression", path=path,
                         hint=f"fix {field} in the adapter config")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise InputError(f"{field} holds a regular expression of {len(pattern)} characters (at most "
                         f"{MAX_PATTERN_LENGTH})", path=path, hint=f"fix {field} in the adapter config")
    try:
        return _compile(pattern)
    except (regex.error, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise InputError(f"{field} holds an invalid regular expression '{pattern[:80]}' ({exc})",
                         path=path, hint=f"fix {field} in the adapter config") from None


def match(pattern: str, name: str, *, field: str, path: object = None, how: str = "match",
          compiled_from: str | None = None) -> Any:
    """``re.match`` (or ``fullmatch``) of a config regex on a module name, refusing one that takes longer
    than :data:`MATCH_TIMEOUT` instead of hanging.

    ``compiled_from`` is the user's pattern when ``pattern`` wraps it (PEFT's ``(.*\\.)?(KEY)$``): errors
    quote what the user wrote.

    Raises:
        InputError: the pattern is invalid or too slow, or the name is too long, naming ``field``.
    """
    if len(name) > MAX_NAME_LENGTH:
        raise InputError(f"module name of {len(name)} characters (at most {MAX_NAME_LENGTH}): "
                         f"{name[:60]}...", path=path)
    if compiled_from is not None:
        compile_pattern(compiled_from, field=field, path=path)
    compiled = compile_pattern(pattern, field=field, path=path)
    user = compiled_from if compiled_from is not None else pattern
    try:
        if pattern in _SLOW:
            raise TimeoutError
        # CPU time of this thread, not wall time: a match preempted on a loaded machine is not slow, and
        # counting it let a real pattern spend its budget in a long-lived process (docs/input-validation.md)
        start = time.thread_time()
        result = getattr(compiled, how)(name, timeout=MATCH_TIMEOUT)
        elapsed = time.thread_time() - start
        if elapsed > SLOW_MATCH:
            _SPENT[pattern] = _SPENT.get(pattern, 0.0) + elapsed
            if _SPENT[pattern] > PATTERN_BUDGET:
                raise TimeoutError
        return result
    except TimeoutError:
        _SLOW.add(pattern)
        raise InputError(f"the regular expression in {field} ('{user[:80]}') takes longer than "
                         f"{MATCH_TIMEOUT} s on a module name such as '{name[:80]}', or {PATTERN_BUDGET} s over "
                         "the model's module names (catastrophic backtracking)", path=path,
                         hint=f"simplify the pattern in {field}") from None



#: The name the plugin API gives :func:`match` (``adaptools.plugin.match_pattern``).
match_pattern = match
