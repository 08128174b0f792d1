"""Each method's unmerged runtime application gives PEFT's own forward (no peft import in the library)."""

from __future__ import annotations

import pytest
import torch
from conftest import SAFE_ADAPTERS, WEIGHT_ADAPTERS, adapter_path, base_path
from peft_oracle import load_base, logits, peft_model

import adaptools

RESIZED = {"llama-resized-vocab": 136}


@pytest.mark.parametrize("name", sorted(WEIGHT_ADAPTERS))
def test_apply_matches_peft_forward(name):
    arch = SAFE_ADAPTERS[name]
    expected = logits(peft_model(base_path(arch), adapter_path(name), resize=RESIZED.get(name)))
    model = load_base(base_path(arch))
    if name in RESIZED:
        model.resize_token_embeddings(RESIZED[name])
    before = logits(model)
    adapter = adaptools.load(adapter_path(name))
    with adaptools.plugin.get_method(adapter.method).apply(adapter, model):  # every PEFT method's fixtures
        got = logits(model)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, before, atol=1e-4), "the adapter had no effect: the test proves nothing"
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)  # undone on exit


def test_apply_refuses_base_mutating_init():
    adapter = adaptools.load(adapter_path("llama-lora"))
    adapter.config["init_lora_weights"] = "olora"
    with pytest.raises(adaptools.UnsupportedOperationError, match="olora"):
        adaptools.plugin.get_method("lora").apply(adapter, load_base(base_path("llama")))


@pytest.mark.parametrize(("module", "expected"), [
    ("model.layers.0.self_attn.q_proj", (8, 8)),
    ("model.layers.0.mlp.down_proj", (2, 8)),
    ("model.layers.1.self_attn.v_proj", (4, 3)),
    ("model.layers.1.mlp.down_proj", (2, 3)),
])
def test_rank_and_alpha_patterns_follow_peft(module, expected):
    from peft import LoraConfig

    from adaptools_plugins.lora.config import lora_rank_alpha

    config = {"r": 4, "lora_alpha": 8, "rank_pattern": {"model.layers.0.self_attn.q_proj": 8, "down_proj": 2},
              "alpha_pattern": {r"layers\.1\..*_proj": 3}}
    assert lora_rank_alpha(config, module) == expected
    peft_config = LoraConfig(**config)
    from peft.utils.other import get_pattern_key

    rank_key = get_pattern_key(peft_config.rank_pattern.keys(), module)
    alpha_key = get_pattern_key(peft_config.alpha_pattern.keys(), module)
    peft_rank = peft_config.rank_pattern.get(rank_key, peft_config.r)
    peft_alpha = peft_config.alpha_pattern.get(alpha_key, peft_config.lora_alpha)
    assert (peft_rank, peft_alpha) == expected


@pytest.mark.parametrize("config", [
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": ["q_proj"], "layers_to_transform": [1]},
    {"target_modules": ["q_proj"], "layers_to_transform": 0, "layers_pattern": "layers"},
    {"target_modules": r".*\.layers\.1\..*_proj"},
    {"target_modules": ["q_proj", "down_proj"], "exclude_modules": ["model.layers.0.mlp.down_proj"]},
    {"target_modules": ["q_proj", "down_proj"], "exclude_modules": r".*layers\.1.*"},
])
def test_target_matching_follows_peft(config):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from adaptools_plugins.peft.matching import is_targeted

    model = load_base(base_path("llama"))
    peft_config = LoraConfig(**config)
    for name, _ in model.named_modules():
        if not name:
            continue
        ours = is_targeted(config, name)
        theirs = check_target_module_exists(peft_config, name)
        assert ours == (bool(theirs) and type(theirs).__name__ != "_ExcludedModule"), name
