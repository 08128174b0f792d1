"""What the FLUX.1 LoRA tests share: the tiny pipeline folder and LoRAs of fixtures/flux.py (built once a
session), and diffusers itself as the reference: what ``FluxLoraLoaderMixin`` loads into the transformer and the
CLIP text encoder, and what its ``fuse_lora`` makes of them."""

from __future__ import annotations

import sys
import warnings

from conftest import FIXTURES

sys.path.insert(0, str(FIXTURES))
import flux as flux_fixtures  # noqa: E402  (the fixture builder)

_BUILT: dict = {}


def build_all(tmp_path_factory):
    """{"pipe": folder, "diffusers": file, "kohya": file, "comfy": file}, built once a session."""
    if not _BUILT:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _BUILT.update(flux_fixtures.build(tmp_path_factory.mktemp("flux")))
    return _BUILT


def models(pipe_folder):
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {"transformer": FluxTransformer2DModel.from_pretrained(pipe_folder / "transformer"),
                "text_encoder": CLIPTextModel.from_pretrained(pipe_folder / "text_encoder")}


def loaded(pipe_folder, lora):
    """component -> model with ``lora`` (a file or a state dict) loaded by diffusers' Flux loader, adapter "x"."""
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin
    from diffusion import allow_old_peft

    allow_old_peft()
    out = models(pipe_folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state, alphas, metadata = FluxLoraLoaderMixin.lora_state_dict(
            str(lora) if not isinstance(lora, dict) else dict(lora), return_alphas=True, return_lora_metadata=True)
        transformer_state = {k: v for k, v in state.items() if k.startswith("transformer.")}
        FluxLoraLoaderMixin.load_lora_into_transformer(transformer_state, alphas, out["transformer"],
                                                       adapter_name="x", metadata=metadata)
        if any(k.startswith("text_encoder.") for k in state):
            FluxLoraLoaderMixin.load_lora_into_text_encoder(state, alphas, out["text_encoder"],
                                                            prefix="text_encoder", adapter_name="x",
                                                            metadata=metadata)
    return out


def diffusers_layers(pipe_folder, lora):
    """module path -> (lora_A, lora_B, scaling) as diffusers loads ``lora``: the reference for reading."""
    out = {}
    for component, model in loaded(pipe_folder, lora).items():
        for name, module in model.named_modules():
            if "x" in getattr(module, "lora_A", {}):
                out[f"{component}.{name}"] = (module.lora_A["x"].weight.detach().clone(),
                                              module.lora_B["x"].weight.detach().clone(), module.scaling["x"])
    return out


def fused(pipe_folder, lora):
    """component -> state dict after diffusers loads ``lora`` and fuses it into every component."""
    from diffusers.loaders.lora_base import fuse_text_encoder_lora
    from diffusers.utils import recurse_remove_peft_layers

    out = {}
    for component, model in loaded(pipe_folder, lora).items():
        if component == "transformer":
            model.fuse_lora(adapter_names=["x"])
        elif any("x" in getattr(m, "lora_A", {}) for m in model.modules()):
            fuse_text_encoder_lora(model, adapter_names=["x"])
        recurse_remove_peft_layers(model)
        out[component] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return out


def deltas(layers):
    """module -> scaling * (B @ A) in fp32: what a LoRA adds to the layer, whatever its factors' split."""
    return {m: s * (b.float() @ a.float()) for m, (a, b, s) in layers.items()}
