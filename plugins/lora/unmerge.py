"""When a LoRA merge can be taken back out of a merged model (``adaptools unmerge``, ``swap``).

A plain LoRA merge adds ``s·w·(B @ A)`` to each target, and ``B``, ``A``, ``s`` and ``w`` are all in the
adapter, so subtracting the same product undoes it up to the one rounding the merge did, and a value that
the merge maps back to the merged one exactly is always at hand (:func:`preimages`; docs/unmerge.md).
Every other kind of update needs something the merge overwrote and neither the merged model nor the
adapter keeps; those adapters are refused here, naming what is missing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch

from adaptools import plugin
from adaptools.plugin import Adapter, BaseInfo, TensorUpdate

from .config import BASE_MUTATING_INITS

_TORCH = {t.code: t.torch for t in plugin.FLOAT_TYPES}


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


def preimages(forward: list[TensorUpdate], base: BaseInfo) -> list[TensorUpdate]:
    """The inverses of a plain LoRA merge's updates (each ``x ↦ fl(x + d)``): ``fl(M − d)``, the very ``d``
    the merge added (one product, computed as the merge computes it), nudged where needed to a value that
    the merge maps back to ``M`` exactly.

    ``fl(M − d)`` is such a value almost always (docs/unmerge.md, "Why re-merging gives MERGED back"); where
    the merge's rounding in a narrower dtype met a power of two (6 of 106 million elements of a bf16 SmolLM2
    merge), it is one step off, and its neighbour in the stored dtype is the base that merges to ``M``. Only
    a value stored in that dtype is nudged (an intermediate of a longer undo chain is fp32 and is left as
    subtracted), and only to a neighbour within two steps that does merge to ``M``.
    """
    out = []
    for update in forward:
        stored = base.find(update.target)
        dtype = _TORCH.get(stored.dtype) if stored is not None else None
        if update.kind != "delta" or dtype is None:
            raise plugin.UnsupportedOperationError(f"cannot unmerge {update.target}: it is not a plain delta")
        out.append(_inverse(update, dtype))
    return out


def _inverse(update: TensorUpdate, dtype: torch.dtype) -> TensorUpdate:
    """``update`` undone (:func:`_undo` of its function, and of its row-block form where it has one)."""
    fn, rows = update.fn, update.rows

    def undo_fn(current: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        return _undo(current, lambda x: fn(x, original), dtype)

    def undo_rows(current: torch.Tensor, sl: slice) -> torch.Tensor:
        assert rows is not None  # given only where the update has rows
        return _undo(current, lambda x: rows(x, sl), dtype)

    return replace(update, fn=undo_fn, rows=None if rows is None else undo_rows, row_delta=None)


def _undo(current: torch.Tensor, forward: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``M − d`` where ``forward(x) = fl(x + d)``; where ``M`` is a value of ``dtype`` (as stored), the value
    of ``dtype`` that ``forward`` takes back to ``M``."""
    delta = forward(torch.zeros_like(current))  # 0 + d = d exactly
    plain = current - delta

    def rnd(x: torch.Tensor) -> torch.Tensor:
        return x if dtype == torch.float32 else x.to(dtype).to(torch.float32)

    if dtype != torch.float32 and not torch.equal(rnd(current), current):
        return plain  # an fp32 intermediate of a longer chain: the merge never rounded it to dtype
    fixed = rnd(plain)
    for _ in range(2):
        again = rnd(fixed + delta)
        wrong = again != current
        if not bool(wrong.any()):
            return fixed
        toward = torch.where(again > current, -math.inf, math.inf).to(dtype)
        fixed = torch.where(wrong, torch.nextafter(fixed.to(dtype), toward).to(torch.float32), fixed)
    return torch.where(rnd(fixed + delta) == current, fixed, rnd(plain))
