"""LyCORIS methods in kohya keys: LoHa (``hada_*``) and LoKr (``lokr_*``) tensors under kohya's module names,
read into PEFT's ``loha`` and ``lokr`` methods, whose role names are LyCORIS' own suffixes.

What differs per method is held here: the roles, which of them a module needs, and how its rank, alpha and
input width follow from the shapes (docs/diffusion.md, "LoHa" and "LoKr"). LoKr's scale is LyCORIS' rule,
which A1111 and ComfyUI follow too: alpha / r, r the rank of a low-rank factor; a module with both factors
full has no rank, and its alpha is ignored (scale 1). PEFT has no such case (its scale is alpha / r with r
from the config), so such a module gets r = alpha = the largest factor side, which gives PEFT's merge
the same scale 1 and satisfies PEFT's full/low-rank rule for both factors.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from adaptools.plugin import AdapterFormatError, SafetensorsFile

from ..lycoris.lokr import factorization

LOHA_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_ROLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
#: method -> its roles, as kohya-key suffixes and as the schema method's role names
ROLES = {"loha": LOHA_ROLES, "lokr": LOKR_ROLES}
NAMES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}


def problem(method: str, roles: Mapping[str, str]) -> str | None:
    """What makes a module of ``method`` unreadable (a factor missing, or saved in two forms); None: complete."""
    if method == "loha":
        need = list(LOHA_ROLES[:4])
        if "hada_t1" in roles or "hada_t2" in roles:
            need += ["hada_t1", "hada_t2"]
        absent = next((r for r in need if r not in roles), None)
        return f"has no {absent}" if absent else None
    for side in ("w1", "w2"):
        full, low = f"lokr_{side}", (f"lokr_{side}_a", f"lokr_{side}_b")
        saved = [r for r in low if r in roles]
        if full in roles and saved:
            return f"saves {full} and {saved[0]} both (one factor, full or low-rank)"
        if full not in roles and len(saved) < 2:
            return f"has no {next(r for r in low if r not in roles) if saved else full}"
    if "lokr_t2" in roles and "lokr_w2" in roles:
        return "saves lokr_t2 beside a full lokr_w2"
    return None


def rank_of(method: str, file: SafetensorsFile, roles: Mapping[str, str]) -> int | None:
    """The module's rank from its low-rank factors; None for a LoKr module whose factors are both full."""
    if method == "loha":
        return int(file.info(roles["hada_w1_b"]).shape[0])
    for role in ("lokr_w1_b", "lokr_w2_b"):
        if role in roles:
            return int(file.info(roles[role]).shape[0])
    return None


def in_width(method: str, file: SafetensorsFile, roles: Mapping[str, str]) -> int:
    """The layer's input width (a conv's flattened with its kernel), for the model-family rules."""
    if method == "loha":
        return int(file.info(roles["hada_w1_b"]).shape[-1])
    left = file.info(roles.get("lokr_w1") or roles["lokr_w1_b"]).shape[-1]
    if "lokr_w2" in roles:
        right = file.info(roles["lokr_w2"]).shape
        return int(left * math.prod(right[1:]))
    width = int(file.info(roles["lokr_w2_b"]).shape[-1])
    if "lokr_t2" in roles:
        width *= math.prod(file.info(roles["lokr_t2"]).shape[2:])
    return int(left * width)


def full_rank(file: SafetensorsFile, roles: Mapping[str, str]) -> int:
    """The r (and alpha) a LoKr module with both factors full gets: its largest factor side."""
    return max(int(s) for role in ("lokr_w1", "lokr_w2") for s in file.info(roles[role]).shape[:2])


def method_config(method: str, file: SafetensorsFile, modules: Mapping[str, Mapping[str, str]]) -> dict[str, Any]:
    """The LycorisConfig fields the shapes decide: ``use_effective_conv2d``; for LoKr ``decompose_both``
    and the ``decompose_factor`` that reproduces every Linear module's split (-1 if it does, else the most
    common left-factor height that does; none: -1, and ``check`` reports the split)."""
    if method == "loha":
        return {"use_effective_conv2d": any("hada_t1" in roles for roles in modules.values())}
    splits = []
    for roles in modules.values():
        full = "lokr_w1" in roles
        a = int(file.info(roles["lokr_w1" if full else "lokr_w1_a"]).shape[0])
        c = int(file.info(roles["lokr_w1" if full else "lokr_w1_b"]).shape[1])
        if "lokr_w2" in roles and len(file.info(roles["lokr_w2"]).shape) == 2:
            b, d = (int(s) for s in file.info(roles["lokr_w2"]).shape)
            splits.append(((a, b), (c, d)))
    factor = -1
    for candidate in [-1, *(a for a, _ in Counter(s[0][0] for s in splits).most_common())]:
        if all((factorization(a * b, candidate), factorization(c * d, candidate)) == ((a, b), (c, d))
               for (a, b), (c, d) in splits):
            factor = candidate
            break
    return {"use_effective_conv2d": any("lokr_t2" in roles for roles in modules.values()),
            "decompose_both": any("lokr_w1_a" in roles for roles in modules.values()),
            "decompose_factor": factor}


def incomplete(method: str, module: str, roles: Mapping[str, str], path: Path) -> AdapterFormatError | None:
    """The error for a module that cannot be read, naming one of its tensors; None when it can."""
    what = problem(method, roles)
    if what is None:
        return None
    return AdapterFormatError(f"{NAMES[method]} module {module} {what}", path=path,
                              tensor=next(iter(roles.values())),
                              hint="the file is incomplete or damaged; save it again")
