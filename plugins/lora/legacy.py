"""LoRA configs of old peft versions (docs/input-validation.md, "Old PEFT configs").

peft 0.2.0 with ``enable_lora``: one LoRA over a fused projection (GPT-2's
``c_attn``, which computes q, k and v at once) that adapts only some of its output blocks.

peft 0.2.0's ``MergedLinear`` stores ``lora_A`` ``[r·g, in]`` (g = number of enabled blocks) and ``lora_B``
as the weight of a ``Conv1d(r·g, out_e, kernel_size=1, groups=2)``, ``[out_e, r·g/2, 1]`` (``out_e`` =
the enabled blocks' outputs). Its forward adds ``s · zero_pad(conv(A x))`` with ``s = lora_alpha / r``:
the convolution's two groups each map one half of A's outputs to one half of the enabled outputs, and
``zero_pad`` puts the enabled outputs in their blocks' places. 0.2.0's own merge cannot run (it adds a
fourth dimension to the 3-D weight, and pads the wrong axis without ``fan_in_fan_out``), so the delta
here is the forward's: ``ΔW = s · B_full @ A``, with ``B_full`` ``[out, r·g]`` holding each group's
``lora_B`` block in the rows of the enabled outputs.

Pattern keys written for old peft: :func:`portable_pattern_keys`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

#: peft 0.2.0 builds lora_B with ``groups=2`` whatever the number of enabled blocks.
GROUPS = 2


def enabled_blocks(config: Mapping[str, Any]) -> list[bool] | None:
    """The ``enable_lora`` list of a peft 0.2.0 MergedLinear config, or None for a plain LoRA."""
    value = config.get("enable_lora")
    if isinstance(value, list) and value and all(isinstance(v, bool) for v in value):
        return value
    return None


def merged_shapes_problem(config: Mapping[str, Any], a_shape: tuple[int, ...], b_shape: tuple[int, ...]
                          ) -> str | None:
    """Why ``lora_A`` / ``lora_B`` shapes are not what peft 0.2.0 saves for this ``enable_lora``, or None."""
    enable = enabled_blocks(config) or []
    g = sum(enable)
    r = config.get("r", 8)
    if g == 0:
        return "enable_lora enables no block"
    if len(a_shape) != 2 or len(b_shape) != 3 or b_shape[2] != 1:
        return (f"with enable_lora, lora_A must be 2-D and lora_B [out, r·g/2, 1]; got {list(a_shape)} and "
                f"{list(b_shape)}")
    if a_shape[0] != r * g or (r * g) % GROUPS or b_shape[1] != r * g // GROUPS or b_shape[0] % GROUPS:
        return (f"enable_lora {enable} with r={r} means lora_A [{r * g}, in] and lora_B [out, {r * g // GROUPS}, "
                f"1]; got {list(a_shape)} and {list(b_shape)}")
    if (b_shape[0] * len(enable)) % g:
        return f"lora_B's {b_shape[0]} outputs do not split into {g} enabled blocks"
    return None


def merged_out_features(config: Mapping[str, Any], b_shape: tuple[int, ...]) -> int:
    """The fused layer's output size: the enabled outputs are ``g`` of its ``len(enable_lora)`` blocks."""
    enable = enabled_blocks(config) or [True]
    return b_shape[0] * len(enable) // sum(enable)


def merged_b(config: Mapping[str, Any], a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``B_full`` ``[out, r·g]`` such that peft 0.2.0's forward adds ``s · B_full @ A @ x``."""
    enable = enabled_blocks(config) or [True]
    out_enabled, in_per = b.shape[0], b.shape[1]
    out_per = out_enabled // GROUPS
    block = torch.zeros(out_enabled, a.shape[0], dtype=b.dtype, device=b.device)
    for j in range(GROUPS):
        block[j * out_per:(j + 1) * out_per, j * in_per:(j + 1) * in_per] = b[j * out_per:(j + 1) * out_per, :, 0]
    out = merged_out_features(config, tuple(b.shape))
    size = out // len(enable)
    rows = [i for i in range(out) if enable[i // size]]
    full = torch.zeros(out, a.shape[0], dtype=b.dtype, device=b.device)
    full[rows] = block
    return full


def portable_pattern_keys(modules: list[str]) -> dict[str, str]:
    """A rank/alpha pattern key per module that selects exactly that module among ``modules`` in every peft
    that reads patterns: 0.6 to 0.14 match ``re.match(rf".*\\.{key}$")`` (a dot must come before the
    key), 0.15 on ``re.match(rf"(.*\\.)?({key})$")``. The key is the escaped module path without its first
    component; a module no such key singles out (one-component paths, or two stacks sharing a suffix)
    gets the ``^``-anchored full path, which only peft 0.15 and later match."""
    def hits(key: str, name: str) -> bool:
        return bool(re.match(rf".*\.{key}$", name) or re.match(rf"(.*\.)?({key})$", name))

    # An escaped path K hits a name that is K or ends with ".K" (no name holds a newline, which "$" treats
    # specially): counting every name and dotted suffix once answers "does another module hit it" without
    # matching every pair (a file with a thousand modules).
    plain = not any("\n" in m for m in modules)
    seen: dict[str, int] = {}
    if plain:
        for other in set(modules):
            parts = other.split(".")
            for i in range(len(parts)):
                seen[".".join(parts[i:])] = seen.get(".".join(parts[i:]), 0) + 1
    keys = {}
    for module in modules:
        parts = module.split(".")
        rest = ".".join(parts[1:]) if len(parts) > 1 else None
        key = re.escape(rest) if rest is not None else None
        if plain and rest is not None:
            clash = seen[rest] > 1  # the module itself ends with ".rest"; any other count is a clash
        else:
            clash = key is None or any(hits(key, other) for other in modules if other != module)
        if key is None or clash:
            key = f"^{re.escape(module)}"
        keys[module] = key
    return keys
