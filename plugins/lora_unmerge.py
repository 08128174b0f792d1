"""When a LoRA merge can be taken back out of a merged model (``adaptools unmerge``, ``swap``).

A plain LoRA merge adds ``s·w·(B @ A)`` to each target, and ``B``, ``A``, ``s`` and ``w`` are all in the
adapter, so subtracting the same product undoes it up to the one rounding the merge did (docs/unmerge.md).
Every other kind of update needs something the merge overwrote and neither the merged model nor the
adapter keeps; those adapters are refused here, naming what is missing.
"""

from __future__ import annotations

from adaptools import Adapter

from .lora_config import BASE_MUTATING_INITS


def unmerge_refusal(adapter: Adapter) -> str | None:
    """Why this LoRA adapter's merge cannot be undone from the merged model and the adapter, or None."""
    config = adapter.config
    if config.get("use_dora"):
        return ("DoRA rescales each row by the norm of the original weight plus the delta, and that norm is in "
                "neither the merged model nor the adapter")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_MUTATING_INITS):
        return (f"init_lora_weights={init!r}: the merge recomputes the initial factors from the original weight, "
                "which the merged model no longer holds; convert it to plain LoRA first (convert --to lora)")
    for module, roles in adapter.modules().items():
        for role in roles:
            if role.startswith("replace_"):
                what = "modules_to_save" if any(module.endswith(m) for m in config.get("modules_to_save") or []) \
                    else "a saved base layer"
                return (f"{module}.{role[len('replace_'):]} is replaced ({what}): the values it replaced are in "
                        "neither the merged model nor the adapter")
            if role == "trainable_tokens":
                return (f"{module} has trainable token rows: the embedding rows they replaced are in neither the "
                        "merged model nor the adapter")
    return None
