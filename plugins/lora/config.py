"""What a PEFT LoRA config means: roles, per-module rank and alpha from ``r`` / ``lora_alpha`` with PEFT's
pattern precedence (and the rules of older peft versions), scaling, trainable token rows (docs/peft.md,
"Config fields adaptools reads", "Scaling, rank and alpha"), and the declared schema of the fields adaptools
reads (docs/input-validation.md).

Which modules a config targets, and how a pattern key selects a module, are the same for every PEFT tuner:
they live in ``plugins/peft/matching.py``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from adaptools.plugin import AdapterFormatError

from ..peft.config_schema import ALPHA, FLAG, INDEX, MAX_ALPHA, MAX_RANK, PATTERNS, RANK, config_schema
from ..peft.config_schema import config_problems as shared_config_problems
from ..peft.matching import ends_with, pattern_key

FACTOR_ROLES = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
ROLES = FACTOR_ROLES + ("lora_bias", "lora_magnitude", "trainable_tokens")
#: init_lora_weights values whose training started from a modified base (docs/peft.md, "OLoRA and PiSSA").
BASE_MUTATING_INITS = ("olora", "pissa", "corda", "lora_ga", "loftq")
#: LoRA variants peft cannot merge, and why.
UNMERGEABLE_FIELDS = {
    "alora_invocation_tokens": "aLoRA activates only after its invocation tokens, so it has no fixed delta",
    "arrow_config": "Arrow routes between adapters per token",
    "kasa_config": "KaSA truncates the base weight",
}

#: The PEFT LoraConfig fields adaptools reads, with their types and ranges. Fields it does not read are
#: carried unchecked (a newer peft may add any).
CONFIG_SCHEMA: dict[str, Any] = config_schema({
    "r": RANK,
    "lora_alpha": ALPHA,
    "use_rslora": FLAG, "use_dora": FLAG, "lora_bias": FLAG, "ensure_weight_tying": FLAG,
    "rank_pattern": {**PATTERNS, "additionalProperties": RANK},
    "alpha_pattern": {**PATTERNS, "additionalProperties": ALPHA},
    "trainable_token_indices": {"anyOf": [{"type": "null"}, {"type": "array", "items": INDEX},
                                          {"type": "object", "additionalProperties": {
                                              "type": "array", "items": INDEX}}],
                                "description": "a list of token ids, or an object of them per module"},
    "init_lora_weights": {"type": ["boolean", "string", "null"], "maxLength": 100},
    "bias": {"enum": ["none", "all", "lora_only", None]},
    "enable_lora": {"type": ["array", "null"], "items": {"type": "boolean"}, "minItems": 1, "maxItems": 64,
                    "description": "a list of true/false per output block (peft 0.2.0)"},
    "peft_version": {"type": ["string", "null"], "maxLength": 100},
})
#: peft versions whose pattern rule differs from today's (docs/input-validation.md, "Old PEFT configs").
SINGLE_KEY_BEFORE = (0, 14)  # up to 0.13.x one key, searched in rank then alpha patterns, sets both
DOTTED_KEY_BEFORE = (0, 15)  # up to 0.14.x a key matched only after a dot: re.match(rf".*\.{key}$")


def config_problems(config: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """``(field, message, rule)`` for every field that breaks :data:`CONFIG_SCHEMA` (LORA001) or holds an
    unusable regex (LORA020)."""
    return [(field, message, "LORA020" if regex else "LORA001")
            for field, message, regex in shared_config_problems(config, CONFIG_SCHEMA)]


def peft_version(config: Mapping[str, Any]) -> tuple[int, int] | None:
    """(major, minor) of the peft that saved the config (recorded from peft 0.18 on), or None."""
    match = re.match(r"^(\d+)\.(\d+)", str(config.get("peft_version") or ""))
    return (int(match[1]), int(match[2])) if match else None


def _value(value: Any, field: str, kind: str) -> Any:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "rank":
        ok = ok and isinstance(value, int) and 1 <= value <= MAX_RANK
    else:
        ok = ok and abs(value) <= MAX_ALPHA
    if not ok:
        raise AdapterFormatError(f"{field} is {repr(value)[:60]}, expected "
                                 + ("a positive integer" if kind == "rank" else "a finite number"),
                                 hint=f"fix {field.split('[')[0]} in adapter_config.json")
    return value


def lora_rank_alpha(config: Mapping[str, Any], module: str, *, rule: str | None = None) -> tuple[int, float]:
    """The rank and alpha PEFT gives ``module`` (rank_pattern / alpha_pattern, else r / lora_alpha).

    ``rule`` picks the pattern rule of a peft generation: ``"current"`` (0.15 on), ``"0.14"`` or
    ``"0.6"`` (0.6 to 0.13); by default the one of the recorded ``peft_version``, else the current one.

    Raises:
        AdapterFormatError: a rank or alpha that is not a usable number, or a pattern that is invalid or
            too slow, naming the field.
    """
    rank_patterns = config.get("rank_pattern") or {}
    alpha_patterns = config.get("alpha_pattern") or {}
    if rule is None:
        version = peft_version(config)
        rule = "current" if version is None or version >= DOTTED_KEY_BEFORE else \
            "0.14" if version >= SINGLE_KEY_BEFORE else "0.6"
    if rule == "0.6":  # one key, the first of rank keys then alpha keys, picks both (peft 0.6 to 0.13)
        key = pattern_key({**dict.fromkeys(rank_patterns), **dict.fromkeys(alpha_patterns)}, module,
                          "rank_pattern", dotted=True)
        rk = key if key in rank_patterns else None
        ak = key if key in alpha_patterns else None
    else:
        rk = pattern_key(rank_patterns, module, "rank_pattern", dotted=rule == "0.14")
        ak = pattern_key(alpha_patterns, module, "alpha_pattern", dotted=rule == "0.14")
    rank = _value(rank_patterns[rk], f"rank_pattern[{rk!r}]", "rank") if rk is not None else \
        _value(config.get("r", 8), "r", "rank")
    alpha = _value(alpha_patterns[ak], f"alpha_pattern[{ak!r}]", "alpha") if ak is not None else \
        _value(config.get("lora_alpha", 8), "lora_alpha", "alpha")
    return int(rank), alpha


def pattern_rule_differences(config: Mapping[str, Any], modules: list[str]) -> list[str]:
    """Modules whose rank or alpha older peft versions read differently from this config, when the
    config does not say which peft saved it: peft 0.6 to 0.13 took one pattern key for both rank and
    alpha, and up to 0.14 a key matched only after a dot (docs/input-validation.md, "Old PEFT configs")."""
    if not (config.get("rank_pattern") or config.get("alpha_pattern")) or peft_version(config) is not None:
        return []
    out = []
    for module in modules:
        current = lora_rank_alpha(config, module, rule="current")
        for rule, versions in (("0.6", "0.6 to 0.13"), ("0.14", "0.14")):
            old = lora_rank_alpha(config, module, rule=rule)
            if old != current:
                out.append(f"{module}: rank {current[0]}, alpha {current[1]:g} in peft >= 0.15; rank {old[0]}, "
                           f"alpha {old[1]:g} in peft {versions}")
                break
    return out


def scaling_for(config: Mapping[str, Any], rank: int, alpha: float) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def token_indices(config: Mapping[str, Any], module: str) -> list[int] | None:
    """The trainable-token row indices for an embedding module (list form targets the input embedding)."""
    spec = config.get("trainable_token_indices")
    if spec is None:
        return None
    if isinstance(spec, list):
        return list(spec)
    for name, indices in spec.items():
        if ends_with(module, [name]):
            return list(indices)
    return None
