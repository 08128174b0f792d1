"""What a PEFT LoRA config means: roles, per-module rank and alpha with PEFT's pattern precedence, scaling,
which modules are targeted, trainable token rows (peft-format.md §1.3, §3.1)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

FACTOR_ROLES = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
ROLES = FACTOR_ROLES + ("lora_bias", "lora_magnitude", "trainable_tokens")
#: init_lora_weights values whose training started from a modified base (peft-format.md §4).
BASE_MUTATING_INITS = ("olora", "pissa", "corda", "lora_ga", "loftq")
#: LoRA variants peft cannot merge, and why.
UNMERGEABLE_FIELDS = {
    "alora_invocation_tokens": "aLoRA activates only after its invocation tokens, so it has no fixed delta",
    "arrow_config": "Arrow routes between adapters per token",
    "kasa_config": "KaSA truncates the base weight",
}


def pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """PEFT's rank/alpha pattern rule: the first key K (dict order) with ``re.match(r"(.*\\.)?(K)$")``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def module_rank_alpha(config: Mapping[str, Any], module: str) -> tuple[int, float]:
    """The rank and alpha PEFT gives ``module`` (rank_pattern / alpha_pattern, else r / lora_alpha)."""
    rank_patterns = config.get("rank_pattern") or {}
    alpha_patterns = config.get("alpha_pattern") or {}
    rk = pattern_key(rank_patterns, module)
    ak = pattern_key(alpha_patterns, module)
    rank = rank_patterns[rk] if rk is not None else config.get("r", 8)
    alpha = alpha_patterns[ak] if ak is not None else config.get("lora_alpha", 8)
    return int(rank), alpha


def scaling_for(config: Mapping[str, Any], rank: int, alpha: float) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def is_targeted(config: Mapping[str, Any], module: str) -> bool:
    """PEFT's target_modules / exclude_modules / layers_to_transform matching for one module path."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, module):
                return False
        elif module in exclude or any(module.endswith(f".{e}") for e in exclude):
            return False
    targets = config.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    if module in targets:
        return True
    if not any(module.endswith(f".{t}") for t in targets):
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
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module)
            if match:
                break
    if not match:
        return False
    idx = int(match.group("idx"))
    return idx == layers if isinstance(layers, int) else idx in layers


def token_indices(config: Mapping[str, Any], module: str) -> list[int] | None:
    """The trainable-token row indices for an embedding module (list form targets the input embedding)."""
    spec = config.get("trainable_token_indices")
    if spec is None:
        return None
    if isinstance(spec, list):
        return list(spec)
    for name, indices in spec.items():
        if module == name or module.endswith(f".{name}"):
            return list(indices)
    return None


#: Base-mutating inits that can be recomputed exactly from the original base weight.
