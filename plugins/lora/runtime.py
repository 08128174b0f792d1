"""LoRA applied to a live torch model without merging (for the perplexity check and ``adaptools eval``):
forward hooks that add each module's LoRA path to its output, as PEFT's unmerged forward does."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from adaptools.plugin import Adapter

from ..peft.common import find_module, undo, weight_layout, weight_of
from .config import lora_rank_alpha, scaling_for, token_indices
from .experts import swap_in, swap_in_per_expert, unwrapped
from .legacy import enabled_blocks, merged_b


@contextmanager
def applied(adapter: Adapter, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Forward hooks that add each module's LoRA path to its output, as PEFT's unmerged forward does."""
    named = dict(model.named_modules())
    handles = []
    saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    config = adapter.config

    try:
        for module_name, roles in adapter.modules().items():
            owner = unwrapped(module_name)[0]
            if not any(c in named for c in (owner, owner.partition(".")[2], f"model.{owner}")):
                swapped = swap_in_per_expert(adapter, named, module_name, roles)  # fused in this model
                if swapped is not None:
                    saved.append(swapped)
                    continue
            layer = find_module(named, owner, adapter)
            for role, tname in roles.items():
                if role.startswith("replace_") or role == "trainable_tokens":
                    param = getattr(layer, role[len("replace_"):] if role != "trainable_tokens" else "weight")
                    saved.append((param, param.data.clone()))
                    with torch.no_grad():
                        if role == "trainable_tokens":
                            rows = torch.tensor(token_indices(config, module_name) or [])
                            param.data[rows] = adapter.tensor(tname).to(param.dtype)
                        else:
                            param.data = adapter.tensor(tname).to(param.dtype)
            info = (config.get("modules") or {}).get(module_name)
            if "lora_A" in roles and isinstance(info, dict) and info.get("kind") == "experts":
                saved.append(swap_in(adapter, layer, module_name, roles))  # a fused parameter: W + ΔW
            elif "lora_A" in roles or "lora_embedding_A" in roles:
                handles.append(layer.register_forward_hook(_lora_hook(adapter, module_name, roles, layer)))
        yield model
    finally:
        undo(handles, saved)


def _lora_hook(adapter: Adapter, module: str, roles: dict[str, str], layer: torch.nn.Module) -> Any:
    config = adapter.config
    rank, alpha = lora_rank_alpha(config, module)
    s = scaling_for(config, rank, alpha)
    embedding = "lora_embedding_A" in roles
    a = adapter.tensor(roles["lora_embedding_A" if embedding else "lora_A"]).float()
    b = adapter.tensor(roles["lora_embedding_B" if embedding else "lora_B"]).float()
    if not embedding and enabled_blocks(config):  # peft 0.2.0 enable_lora (legacy.py)
        b = merged_b(config, a, b)
    bias = adapter.tensor(roles["lora_bias"]).float() if "lora_bias" in roles else None
    magnitude = adapter.tensor(roles["lora_magnitude"]).float() if "lora_magnitude" in roles else None
    weight = weight_of(layer)
    device = weight.device  # the adapter's path computes where its layer does (a 4-bit layer lives on CUDA)
    a, b = a.to(device), b.to(device)
    bias = bias.to(device) if bias is not None else None
    magnitude = magnitude.to(device) if magnitude is not None else None
    transposed = not embedding and weight_layout(tuple(weight.shape), b.shape[0], a.shape[1],
                                                 bool(config.get("fan_in_fan_out"))) == "fan_in_fan_out"

    def hook(mod: torch.nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x: torch.Tensor = inputs[0]
        if embedding:
            lora = torch.nn.functional.embedding(x, a.T) @ b.T * s
            if magnitude is not None:
                w = weight_of(mod).float()
                norm: torch.Tensor = (w + s * (b @ a).T).norm(p=2, dim=0)  # (unannotated in torch)
                return ((output.float() + lora) * (magnitude / norm)).to(output.dtype)
            return (output.float() + lora).to(output.dtype)
        xf = x.float()
        lora = (xf @ a.T) @ b.T * s
        if bias is not None:
            lora = lora + s * bias
        if magnitude is None:
            return (output.float() + lora).to(output.dtype)
        w = weight_of(mod).float()
        w = w.T if transposed else w
        norm = (w + s * (b @ a)).norm(p=2, dim=1)
        factor = magnitude / norm
        layer_bias: torch.Tensor | None = getattr(mod, "bias", None)
        base_out = output.float() - (layer_bias.float() if layer_bias is not None else 0)
        result = factor * base_out + factor * ((xf @ a.T) @ b.T * s)
        if layer_bias is not None:
            result = result + layer_bias.float()
        if bias is not None:
            result = result + s * bias
        return result.to(output.dtype)

    return hook
