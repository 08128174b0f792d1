"""What the image-model LoRA tests share: the tiny pipelines and LoRAs of fixtures/diffusion.py (built once a
session), and diffusers itself as the reference: what ``load_lora_weights`` puts into a pipeline's layers."""

from __future__ import annotations

import re
import sys
import warnings
from collections import Counter

import torch
from conftest import FIXTURES
from safetensors import safe_open

sys.path.insert(0, str(FIXTURES))
import diffusion as diffusion_fixtures  # noqa: E402  (the fixture builder)

FAMILIES = ("sd1", "sdxl")


_BUILT: dict = {}


def build_all(tmp_path_factory):
    """family -> {"pipe": folder, "diffusers": file, "diffusers-plain": file, "kohya": file}, built once a
    session whichever test file asks first (each test file's ``built`` fixture calls this)."""
    if not _BUILT:
        root = tmp_path_factory.mktemp("diffusion")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _BUILT.update({family: diffusion_fixtures.build(root, family) for family in FAMILIES})
    return _BUILT


def pipeline(folder):
    from diffusers import DiffusionPipeline

    diffusion_fixtures.allow_old_peft()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)


COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def diffusers_layers(pipe_folder, lora_file):
    """module path (component-prefixed) -> (lora_A, lora_B, scaling), as diffusers loads ``lora_file`` into the
    pipeline: the reference for reading."""
    pipe = pipeline(pipe_folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_lora_weights(str(lora_file), adapter_name="x")
    out = {}
    for component in COMPONENTS:
        model = getattr(pipe, component, None)
        if model is None:
            continue
        for name, module in model.named_modules():
            if hasattr(module, "lora_A") and "x" in getattr(module, "lora_A", {}):
                out[f"{component}.{name}"] = (module.lora_A["x"].weight.detach().clone(),
                                              module.lora_B["x"].weight.detach().clone(), module.scaling["x"])
    return out


def ours(adapter):
    """The same view of an adaptools adapter."""
    modules = adapter.config["modules"]
    return {m: (adapter.tensor(r["lora_A"]), adapter.tensor(r["lora_B"]), modules[m]["scaling"])
            for m, r in adapter.modules().items()}


#: Attention projections diffusers' kohya loader renames to the attention-processor style (``to_q_lora``...).
ATTENTION = re.compile(r"\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|self_attn\.(q|k|v|out)_proj)$")


def as_diffusers_reads(adapter, style):
    """What diffusers 0.42.1 should load from the file ``adapter`` was read from: the same factors and
    scales, except that its kohya loader gives attention projections the component's most common alpha
    (their own alpha keys never reach peft's alpha_pattern; docs/diffusion.md, "What diffusers does
    differently")."""
    layers = ours(adapter)
    if style != "kohya":
        return layers
    modules = adapter.config["modules"]
    common = {}
    for component in COMPONENTS:
        alphas = Counter(v["alpha"] for m, v in modules.items() if m.split(".")[0] == component)
        if alphas:
            top = alphas.most_common()
            common[component] = top[0][0]
    out = {}
    for m, (a, b, s) in layers.items():
        if ATTENTION.search(m):
            s = common[m.split(".")[0]] / modules[m]["rank"]
        out[m] = (a, b, s)
    return out


def same_layers(a, b):
    assert sorted(a) == sorted(b)
    for module in a:
        (a1, b1, s1), (a2, b2, s2) = a[module], b[module]
        assert a1.dtype == a2.dtype and torch.equal(a1, a2), module
        assert b1.dtype == b2.dtype and torch.equal(b1, b2), module
        assert s1 == s2, (module, s1, s2)


def raw_tensors(path):
    """key -> (dtype, shape, bytes) of a safetensors file."""
    with safe_open(str(path), "pt") as f:
        return {k: (str(t.dtype), tuple(t.shape), t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
                for k in f.keys() for t in [f.get_tensor(k)]}
