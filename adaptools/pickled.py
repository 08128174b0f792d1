"""The one place adaptools unpickles: legacy ``.bin`` tensor files, only when the user allowed it.

Pickles can run code when read. Formats call :func:`load_pickled_tensors` so that the rule is the same
everywhere: refuse without ``allow_pickle`` (``--allow-pickle``), and even then read with
``torch.load(weights_only=True)``, which accepts plain tensors and containers only.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .errors import InputError, UnsafeInputError


def load_pickled_tensors(path: Path, *, allow_pickle: bool,
                         instead: str = "a safetensors file") -> dict[str, torch.Tensor]:
    """The ``{name: tensor}`` dict in the pickle at ``path``; ``instead`` names the safe file to ask for."""
    if not allow_pickle:
        raise UnsafeInputError(f"weights are a pickle ({path.name}), which can run code when read", path=path,
                               hint="pass --allow-pickle if you trust this file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch raises many types for bad pickles; its advice (weights_only=False) is unsafe
        raise InputError("cannot read pickle safely: it is corrupt or holds more than plain tensors", path=path,
                         hint=f"ask for {instead} instead") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError("pickle does not hold a dict of tensors", path=path)
    return state
