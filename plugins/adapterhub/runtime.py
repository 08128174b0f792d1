"""Bottleneck adapters applied to a live model, unmerged: the adapter's forward as the ``adapters``
library computes it, hooked onto each adapted sub-layer of a pre-norm decoder (what ``eval --adapter`` and
the checks use; docs/methods.md)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from adaptools.plugin import Adapter, IncompatibleBaseError, UnsupportedOperationError

from .config import SUBLAYERS, enabled, flags


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps=1e-5)  # nn.LayerNorm's default eps


def bottleneck_forward(h: torch.Tensor, r: torch.Tensor, t: Mapping[str, torch.Tensor], f: Mapping[str, Any],
                       act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The new residual stream after one adapter location, from the sub-layer output ``h`` and the residual
    ``r`` that enters the sub-layer (the library's pre_forward, forward and post_forward with no layer norm)."""
    if f["is_parallel"]:
        x = residual = r
    else:
        x = h + r if f["original_ln_before"] else h
        residual = h if f["residual_before_ln"] is True else x
    z = _layer_norm(x, t["norm_before"], t["norm_before_bias"]) if f["ln_before"] else x
    up = F.linear(act(F.linear(z, t["down"], t["down_bias"])), t["up"], t["up_bias"])
    out = up * (t["scaling"] if "scaling" in t else float(f["scaling"]))
    if f["use_gating"]:
        out = out * torch.sigmoid(F.linear(x, t["gate"], t["gate_bias"])).mean(dim=1).unsqueeze(-1)
    if f["is_parallel"]:
        if f["ln_after"]:
            out = _layer_norm(out, t["norm_after"], t["norm_after_bias"])
        out = out + h
    else:
        if f["adapter_residual_before_ln"]:
            out = out + residual
        if f["ln_after"]:
            out = _layer_norm(out, t["norm_after"], t["norm_after_bias"])
        if not f["adapter_residual_before_ln"]:
            out = out + residual
    return out + r if f["original_ln_after"] else out


def _find(named: Mapping[str, torch.nn.Module], path: str, adapter: Adapter) -> torch.nn.Module:
    for candidate in (path, path.partition(".")[2], f"model.{path}"):
        if candidate in named:
            return named[candidate]
    raise IncompatibleBaseError(f"the model has no module {path}", path=adapter.source)


@contextmanager
def applied(adapter: Adapter, model: torch.nn.Module, act: Callable[[torch.Tensor], torch.Tensor]
             ) -> Iterator[torch.nn.Module]:
    """Hooks that rewrite each adapted sub-layer's output to ``bottleneck_forward(h, r) - r``: the model adds
    the residual ``r`` itself, and ``r`` is the input of the norm in front of the sub-layer (pre-norm)."""
    f = flags(adapter.config)
    named = dict(model.named_modules())
    handles = []
    try:
        for module, roles in adapter.modules().items():
            layer_path, _, location = module.rpartition(".")
            if not enabled(f, module):
                continue
            layer = _find(named, layer_path, adapter)
            pair = next(((s, n) for s, n in SUBLAYERS.get(location, ((), ()))[0]
                         if hasattr(layer, s) and hasattr(layer, n)), None)
            if pair is None:
                raise UnsupportedOperationError(
                    f"cannot apply {module}: adaptools applies bottleneck adapters to pre-norm decoder layers "
                    f"(Llama-style or GPT-2); {type(layer).__name__} is neither", path=adapter.source)
            sublayer, norm = getattr(layer, pair[0]), getattr(layer, pair[1])
            tensors = {role: adapter.tensor(name).float() for role, name in roles.items()}
            state: dict[str, torch.Tensor] = {}
            handles.append(norm.register_forward_pre_hook(_capture(state)))
            handles.append(sublayer.register_forward_hook(_rewrite(state, tensors, f, act)))
        yield model
    finally:
        for handle in handles:
            handle.remove()


def _capture(state: dict[str, torch.Tensor]) -> Callable[..., None]:
    def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        state["residual"] = args[0]
    return hook


def _rewrite(state: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], f: Mapping[str, Any],
             act: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., Any]:
    def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        h = output[0] if isinstance(output, tuple) else output
        r = state["residual"]
        t = {k: v.to(h.device) for k, v in tensors.items()}
        new = (bottleneck_forward(h.float(), r.float(), t, f, act) - r.float()).to(h.dtype)
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
    return hook
