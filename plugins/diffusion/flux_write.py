"""Writing a FLUX.1 LoRA in the key styles that name BFL's layers: kohya (``lora_unet_<BFL layer, dots as _>``,
``lora_te1_`` for CLIP-L) and BFL/ComfyUI (``diffusion_model.<BFL layer>``, ``text_encoders.clip_l.transformer.``),
each with ``lora_down``/``lora_up`` and an ``alpha`` per stored layer.

Those styles store a fused layer (``img_attn.qkv``, ``linear1``) as one LoRA, so the diffusers modules it holds
are fused back, only where that is exact (docs/diffusion.md, "Flux"): every part present with one rank and one
alpha and the same down factor: that down factor, the up factors stacked by rows; else every part with one rank
and one scale: the down factors stacked, the up factors on the block diagonal (rank and alpha times the number of
parts; diffusers reads this form back into the parts). Anything else is refused naming the module.
"""

from __future__ import annotations

from pathlib import Path

import torch

import adaptools
from adaptools import plugin
from adaptools.plugin import Adapter, UnsupportedOperationError

from .common import module_alphas
from .flux_names import Layer, layers_of
from .kohya_facts import alpha_tensor, kohya_facts
from .names import component_of

#: key style -> (transformer prefix, separator inside the layer name, text-encoder prefix)
STYLES = {"kohya": ("lora_unet_", "_", None), "bfl": ("diffusion_model.", ".", "text_encoders.clip_l.transformer.")}


def is_flux_adapter(adapter: Adapter) -> bool:
    """An adapter for a Flux pipeline: its family is ``flux`` or it adapts a ``transformer`` component."""
    return adapter.config.get("model_family") == "flux" or any(
        component_of(m) == "transformer" for m in adapter.modules())


def write(adapter: Adapter, path: Path, style: str) -> None:
    """``adapter`` in the kohya or BFL key style (``style``), fused layers fused back where exact."""
    modules = module_alphas(adapter)
    facts = kohya_facts(adapter)
    absent = set(facts.get("alpha_absent") or [])
    dtype = facts.get("alpha_dtype")
    prefix, sep, te_prefix = STYLES[style]
    te_prefix = te_prefix or f"{facts.get('te_prefix') or 'lora_te1'}_"
    tensors: dict[str, torch.Tensor] = {}
    flux = {m for m in modules if component_of(m) == "transformer"}
    for module in sorted(set(modules) - flux):
        component, _, inner = module.partition(".")
        if component != "text_encoder":
            raise UnsupportedOperationError(f"module {module} is not in Flux's transformer or CLIP-L text_encoder",
                                            path=adapter.source, hint="write it with --to diffusers")
        name = te_prefix + (inner.replace(".", "_") if style == "kohya" else inner)
        roles = adapter.modules()[module]
        rank, alpha = modules[module]
        _put(tensors, name, adapter.tensor(roles["lora_A"]), adapter.tensor(roles["lora_B"]),
             None if module in absent and alpha == rank else alpha, dtype, module, adapter)
    layers, missing = layers_of(flux)
    if missing:
        raise UnsupportedOperationError(f"module {missing[0]} is no FLUX.1 layer the {style} key style names",
                                        path=adapter.source, hint="write it with --to diffusers")
    for layer in layers:
        name = prefix + layer.bfl.replace(".", sep)
        down, up, alpha = _fuse(adapter, layer, modules)
        keep = not (all(m in absent for m in layer.modules) and alpha == down.shape[0])
        _put(tensors, name, down, up, alpha if keep else None, dtype, layer.modules[0], adapter)
    plugin.save_tensors(path, dict(sorted(tensors.items())),
                        {"format": "pt", "adaptools.tool": f"adaptools {adaptools.__version__}"})


def _put(tensors: dict[str, torch.Tensor], name: str, down: torch.Tensor, up: torch.Tensor, alpha: float | None,
         dtype: str | None, module: str, adapter: Adapter) -> None:
    tensors[f"{name}.lora_down.weight"] = down.contiguous()
    tensors[f"{name}.lora_up.weight"] = up.contiguous()
    if alpha is not None:
        tensors[f"{name}.alpha"] = alpha_tensor(alpha, dtype, module, adapter)


def _fuse(adapter: Adapter, layer: Layer, modules: dict[str, tuple[int, float]]) -> tuple[torch.Tensor, torch.Tensor,
                                                                                          float]:
    """(down, up, alpha) of one stored layer from the diffusers modules it holds; refused where not exact."""
    present = [m for m in layer.modules if m in modules]
    if len(present) < len(layer.modules):
        absent = [m.rsplit(".", 1)[-1] for m in layer.modules if m not in modules]
        raise UnsupportedOperationError(
            f"module {present[0]} is part of the fused FLUX.1 layer {layer.bfl}, which the adapter does not adapt "
            f"whole (no LoRA on {', '.join(absent)})", path=adapter.source,
            hint="kohya and BFL files store that layer as one LoRA; write this adapter with --to diffusers")
    downs = [adapter.tensor(adapter.modules()[m]["lora_A"]) for m in layer.modules]
    ups = [adapter.tensor(adapter.modules()[m]["lora_B"]) for m in layer.modules]
    ranks = [modules[m][0] for m in layer.modules]
    alphas = [modules[m][1] for m in layer.modules]
    if len(downs) == 1:
        up = ups[0]
        if layer.swapped:
            first, second = up.chunk(2, dim=0)
            up = torch.cat([second, first], dim=0)
        return downs[0], up, alphas[0]
    if len(set(ranks)) == 1 and len(set(alphas)) == 1 and all(torch.equal(downs[0], d) for d in downs[1:]):
        return downs[0], torch.cat(ups, dim=0), alphas[0]
    if len(set(ranks)) == 1 and len({a / r for a, r in zip(alphas, ranks)}) == 1:
        r, n = ranks[0], len(ranks)
        up = torch.zeros(sum(u.shape[0] for u in ups), r * n, dtype=ups[0].dtype)
        row = 0
        for i, u in enumerate(ups):
            up[row:row + u.shape[0], i * r:(i + 1) * r] = u
            row += u.shape[0]
        return torch.cat(downs, dim=0), up, alphas[0] * n
    raise UnsupportedOperationError(
        f"the parts of the fused FLUX.1 layer {layer.bfl} ({', '.join(m.rsplit('.', 1)[-1] for m in layer.modules)}) "
        f"have ranks {ranks} and alphas {alphas}; one stored LoRA holds them exactly only with one rank and one scale",
        path=adapter.source, tensor=adapter.modules()[layer.modules[0]]["lora_A"],
        hint="write this adapter with --to diffusers")
