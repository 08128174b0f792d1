"""What a kohya file says beyond its factors and alpha values (each alpha's stored type, the modules without an
alpha, the text-encoder prefix, LoKr's ignored alphas), kept in the adapter's config so that writing the kohya
style again gives the same bytes, and how an alpha is stored (docs/diffusion.md, "kohya names"). Shared by the
kohya writers of SD (kohya.py) and Flux (flux_write.py) and by the diffusers writer, which carries the facts
through its header.
"""

from __future__ import annotations

from typing import Any

import torch

from adaptools import plugin
from adaptools.plugin import Adapter, AdapterFormatError

_ALPHA_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32}


#: What a kohya file says beyond the factors and alpha values, kept so that writing it again gives the same
#: bytes: the alphas' stored types, the modules without an alpha, the text-encoder prefix, and the alpha a LoKr
#: module with both factors full stores but nobody uses (module -> [[rank, alpha] it reads as, stored alpha]).
FACTS_SCHEMA = {"type": "object", "additionalProperties": False, "properties": {
    "alpha_dtype": {"enum": [*_ALPHA_DTYPES, None]},
    "alpha_dtypes": {"type": "object", "additionalProperties": {"enum": list(_ALPHA_DTYPES)}},
    "alpha_absent": {"type": "array", "items": {"type": "string", "maxLength": 1000}},
    "lokr_ignored_alpha": {"type": "object", "additionalProperties": {
        "type": "array", "minItems": 2, "maxItems": 2, "prefixItems": [
            {"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "integer", "minimum": 1}},
            {"type": "number"}]}},
    "te_prefix": {"enum": ["lora_te", "lora_te1"]}}}


def kohya_facts(adapter: Adapter) -> dict[str, Any]:
    """The kohya facts an adapter carries (read from a kohya file, or passed through a diffusers file), or {}."""
    facts = (adapter.config.get("diffusion") or {}).get("kohya") or {}
    problems = plugin.json_problems(facts, FACTS_SCHEMA)
    if problems:
        raise AdapterFormatError(f"diffusion.kohya in the config: {problems[0][1]}", path=adapter.source)
    return dict(facts)


def alpha_tensor(alpha: float, dtype_name: str | None, module: str, adapter: Adapter) -> torch.Tensor:
    """alpha as a 0-d tensor: in the type the file it came from used, else float32 (what sd-scripts writes
    when training in fp32), widened to float64 when float32 would change the value."""
    dtype = _ALPHA_DTYPES.get(dtype_name or "", torch.float32)
    if dtype.is_floating_point is False and not float(alpha).is_integer():
        dtype = torch.float32
    value = torch.tensor(alpha, dtype=torch.float64).to(dtype)
    if float(value) != float(alpha):
        value = torch.tensor(alpha, dtype=torch.float64)
    if float(value) != float(alpha):
        raise AdapterFormatError(f"alpha {alpha!r} of {module} cannot be stored exactly", path=adapter.source)
    return value
