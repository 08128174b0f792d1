"""The types and ranges of the PEFT config fields adaptools reads, as JSON Schema (checked with jsonschema
through ``plugin.json_problems``), for every PEFT method: one declaration per field kind, so that a rank, an
alpha or a list of module names is held to the same bounds whichever tuner's config holds it
(docs/input-validation.md, "What each input must hold").

Every count a config gives is bounded here, before any rule or merge reads it: a rank, a block size, an
iteration count (OFT's Neumann series) of a billion would otherwise allocate or loop for as long.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from adaptools import plugin

#: Largest rank and largest |alpha| accepted: far above any real adapter, low enough that alpha / r stays a
#: sane scale (an alpha of 1e300 merges into weights full of Inf).
MAX_RANK = 65536
MAX_ALPHA = 1e6
#: Most terms of OFT's truncated Neumann series adaptools evaluates (PEFT's default is 5).
MAX_SERIES_TERMS = 64
#: Most butterfly factors BOFT builds (each doubles the block count; 2**16 blocks is past any weight).
MAX_BUTTERFLY_FACTORS = 16

RANK = {"type": "integer", "minimum": 1, "maximum": MAX_RANK,
        "description": f"a positive integer (at most {MAX_RANK})"}
SIZE = {"type": "integer", "minimum": 0, "maximum": MAX_RANK,
        "description": f"a non-negative integer (at most {MAX_RANK})"}
ALPHA = {"type": "number", "minimum": -MAX_ALPHA, "maximum": MAX_ALPHA,
         "description": f"a finite number of size at most {MAX_ALPHA:g}"}
SHARE = {"type": "number", "minimum": 0, "maximum": 1, "description": "a number from 0 to 1"}
FLAG = {"type": ["boolean", "null"], "description": "true or false"}
SEED = {"type": "integer", "minimum": 0, "maximum": 2**64 - 1, "description": "a non-negative 64-bit integer"}
NAME = {"type": "string", "minLength": 1, "maxLength": 1000}
NAMES = {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 1000}, {"type": "array", "items": NAME}],
         "description": "a list of module names, or one regular expression"}
INDEX = {"type": "integer", "minimum": 0, "maximum": 2**31}
PATTERNS = {"type": ["object", "null"], "propertyNames": {"minLength": 1, "maxLength": 1000},
            "description": "an object mapping regular expressions to values"}

#: Fields every PEFT tuner's config may hold with the same meaning.
COMMON: dict[str, Any] = {
    "target_modules": NAMES,
    "exclude_modules": NAMES,
    "modules_to_save": {"type": ["array", "null"], "items": NAME, "description": "a list of module names"},
    "layers_to_transform": {"anyOf": [{"type": "null"}, INDEX, {"type": "array", "items": INDEX}],
                            "description": "a layer index or a list of layer indices"},
    "layers_pattern": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 1000},
                                 {"type": "array", "items": {"type": "string", "maxLength": 1000}}],
                       "description": "a name or a list of names"},
    "fan_in_fan_out": FLAG,
}


def config_schema(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The schema of a tuner's config: the common fields and the tuner's own (which may override them).
    Fields it names nowhere are carried unchecked (a newer peft may add any)."""
    return {"type": "object", "properties": {**COMMON, **fields}}


def config_problems(config: Mapping[str, Any], schema: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """``(field, message, is_regex)`` for each field that breaks ``schema`` and each unusable regular
    expression (``target_modules`` and the like given as one regex, pattern keys)."""
    problems = [(field, message, False) for field, message in plugin.json_problems(config, schema)]
    bad = {field.split("[")[0] for field, _, _ in problems}
    for field in ("target_modules", "exclude_modules", "layers_pattern"):
        value = config.get(field)
        if field in bad:
            continue
        patterns = [value] if isinstance(value, str) else value if field == "layers_pattern" and value else []
        problems += [(field, message, True) for pattern in patterns
                     if (message := _regex_problem(pattern, field))]
    for field in ("rank_pattern", "alpha_pattern"):
        if field not in bad and isinstance(config.get(field), dict):
            problems += [(field, message, True) for key in config[field]
                         if (message := _regex_problem(key, f"{field} key"))]
    return problems


def _regex_problem(pattern: str, field: str) -> str | None:
    try:
        plugin.compile_pattern(pattern, field=field)
    except plugin.InputError as exc:
        return exc.message
    return None
