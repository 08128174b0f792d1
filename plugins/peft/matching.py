"""Which modules a PEFT config selects, the same for every tuner: ``target_modules`` /
``exclude_modules`` / ``layers_to_transform`` (docs/peft.md, "Which modules are targeted"), and the key
rule of ``rank_pattern`` / ``alpha_pattern`` (docs/peft.md, "Scaling, rank and alpha").

Every method family matches modules through here, so a tuner reads its config exactly as PEFT's
``BaseTuner`` does whatever its own fields. Config regexes go through ``plugin.match_pattern``: PEFT's
``re`` semantics, with a time limit.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from typing import Any

from adaptools import plugin

match_pattern = plugin.match_pattern


def ends_with(module: str, names: Iterable[str]) -> bool:
    """Whether ``module`` is one of ``names`` or ends with ``.<name>`` for one of them (PEFT's suffix match)."""
    return any(module == n or module.endswith(f".{n}") for n in names)


def pattern_key(patterns: Mapping[str, Any], module: str, field: str = "rank_pattern", *,
                dotted: bool = False) -> str | None:
    r"""PEFT's rank/alpha pattern rule: the first key K (dict order) with ``re.match(r"(.*\.)?(K)$")``
    (peft >= 0.15), or with ``re.match(r".*\.K$")`` when ``dotted`` (peft 0.6 to 0.14)."""
    index = _literal_index(tuple(patterns)) if "\n" not in module and len(module) <= 1000 else None
    if index is not None:  # every key a literal path: the same answer by dictionary look-ups
        exact, suffix = index
        parts = module.split(".")
        hits = [suffix.get(".".join(parts[i:])) for i in range(1, len(parts))]
        if not dotted:
            hits.append(exact.get(module))
        found = [h for h in hits if h is not None]
        return min(found)[1] if found else None
    for key in patterns:
        wrapped = rf".*\.{key}$" if dotted else rf"(.*\.)?({key})$"
        if match_pattern(wrapped, module, field=f"{field} key", compiled_from=key):
            return key
    return None


#: A pattern key that is a literal module path: letters, digits, underscores and escaped dots (``re.escape``d
#: paths, as adaptools writes them), optionally anchored with ``^``.
_LITERAL = re.compile(r"(\^?)((?:[A-Za-z0-9_]|\\\.)+)")


_Index = dict[str, tuple[int, str]]


@functools.lru_cache(maxsize=64)
def _literal_index(keys: tuple[object, ...]) -> tuple[_Index, _Index] | None:
    r"""When every key is a literal path, PEFT's rule is a string comparison: ``(.*\.)?(K)$`` holds exactly
    when the module is K or ends with ``.K`` (only the first with ``^K``), ``.*\.K$`` exactly when it ends
    with ``.K`` (never with ``^K``). Returns (path -> first (position, key) matching the whole module, path ->
    first (position, key) matching a dotted suffix), or None when some key is a real regex (then every key
    goes through the regex engine, with its checks). Module names holding a newline, which ``$`` and ``.``
    treat specially, never come here."""
    exact: dict[str, tuple[int, str]] = {}
    suffix: dict[str, tuple[int, str]] = {}
    for position, key in enumerate(keys):
        found = _LITERAL.fullmatch(key) if isinstance(key, str) and len(key) <= 500 else None
        if found is None:
            return None
        path = found[2].replace("\\.", ".")
        exact.setdefault(path, (position, found.string))
        if found[1] != "^":
            suffix.setdefault(path, (position, found.string))
    return exact, suffix


def is_targeted(config: Mapping[str, Any], module: str) -> bool:
    """PEFT's target_modules / exclude_modules / layers_to_transform matching for one module path."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if match_pattern(exclude, module, field="exclude_modules", how="fullmatch"):
                return False
        elif module in exclude or ends_with(module, exclude):
            return False
    targets = config.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        return match_pattern(targets, module, field="target_modules", how="fullmatch") is not None
    if module in targets:
        return True
    if not ends_with(module, targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    patterns = config.get("layers_pattern")
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        for p in [patterns] if isinstance(patterns, str) else patterns:
            match = match_pattern(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module, field="layers_pattern",
                                  compiled_from=p)
            if match:
                break
    if not match:
        return False
    idx = int(match.group("idx"))
    return idx == layers if isinstance(layers, int) else idx in layers
