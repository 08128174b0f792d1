"""Taking a folded linear bottleneck adapter back out of its output projection (``adaptools unmerge``).

The merge folds ``h' = M·h + c`` with ``M = I + S·U·D`` into the projection that produces ``h``: ``W' = M·W``
and ``b' = M·b + c`` (bottleneck.py). ``S·U·D`` has rank at most ``d`` (the bottleneck size), so ``M`` is the
identity outside the span of the columns of ``S·U`` and ``Dᵀ``: with ``Q`` an orthonormal basis of that span
(``H × 2d``), ``M = I + Q·(T − I)·Qᵀ`` where ``T = Qᵀ·M·Q`` is only ``2d × 2d``. So the singular values of
``M`` are those of ``T`` (and ones), its inverse is ``I + Q·(T⁻¹ − I)·Qᵀ``, and both cost ``O(H·d)`` per
column instead of a dense ``H × H`` solve (docs/unmerge.md, "Bottleneck folds").

When ``M`` is singular (the adapter cancels a direction of the sub-layer's output, e.g. ``S·U·D = −v·vᵀ``)
the merge erased that direction of ``W`` and nothing can restore it: such adapters are refused, naming the
smallest singular value. ``M`` is also refused when its condition number exceeds 2²³, where the fp32
rounding of ``W'`` alone is amplified beyond the precision fp32 holds.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from adaptools.plugin import Adapter, TensorUpdate, UnsupportedOperationError

#: Above this condition number the inverse turns fp32 rounding noise of W' into errors larger than W's precision.
MAX_CONDITION = 2.0**23


def inverse_map(scaled_up: torch.Tensor, down: torch.Tensor, where: str, adapter: Adapter
                ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x ↦ M⁻¹·x`` (float64, along the first dimension) for ``M = I + scaled_up @ down``; refuses a singular
    or ill-conditioned ``M`` with the reason."""
    hidden = scaled_up.shape[0]
    q: torch.Tensor
    q, _ = torch.linalg.qr(torch.cat([scaled_up, down.T], dim=1))  # H x min(H, 2d), orthonormal columns
    t = torch.eye(q.shape[1], dtype=torch.float64) + (q.T @ scaled_up) @ (down @ q)
    sv = torch.linalg.svdvals(t)
    full = q.shape[1] >= hidden  # the span is everything: no unit singular values outside it
    largest = float(sv.max()) if full else max(float(sv.max()), 1.0)
    smallest = float(sv.min()) if full else min(float(sv.min()), 1.0)
    if smallest == 0.0 or largest / smallest > MAX_CONDITION:
        raise UnsupportedOperationError(
            f"cannot unmerge {where}: the folded map I + S·U·D is singular (smallest singular value "
            f"{smallest:.3g}, condition number {largest / smallest if smallest else float('inf'):.3g}), so the "
            "merge erased part of the projection's output and it cannot be recovered", path=adapter.source)
    correction: torch.Tensor = torch.linalg.inv(t) - torch.eye(q.shape[1], dtype=torch.float64)

    def apply(x: torch.Tensor) -> torch.Tensor:
        qd = q.to(x.device)
        return x + qd @ (correction.to(x.device) @ (qd.T @ x))

    return apply


def unfold_updates(adapter: Adapter, target: str, bias_name: str | None, scaled_up: torch.Tensor,
                   down: torch.Tensor, shift: torch.Tensor, conv1d: bool, source: tuple[str, str],
                   where: str) -> list[TensorUpdate]:
    """The inverse of the fold: ``W = M⁻¹·W'`` (GPT-2 Conv1D stores ``Wᵀ``: ``W = W'·M⁻ᵀ``) and
    ``b = M⁻¹·(b' − c)``, in float64, rounded once by the merge engine. Labelled ``output_map``, the kind they
    undo, so the engine runs them where the reverse of the merge's order puts them."""
    inverse = inverse_map(scaled_up, down, where, adapter)

    def unfold_weight(current: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        x = current.double()
        return (inverse(x.T).T if conv1d else inverse(x)).float()

    updates = [TensorUpdate(target, "output_map", unfold_weight, source=source[0])]
    if bias_name is not None:
        def unfold_bias(current: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
            return inverse(current.double() - shift.to(current.device).float().double()).float()

        updates.append(TensorUpdate(bias_name, "output_map", unfold_bias, source=source[1]))
    return updates
