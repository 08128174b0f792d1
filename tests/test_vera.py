"""VeRA against peft 0.21.2: saved and regenerated projections, merge (Linear and GPT-2 Conv1D), runtime
application, check rules, bad input. The generic suites (test_merge, test_roundtrip, test_lora_runtime,
test_check) also run over the three fixtures."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import adapter_path, base_path
from method_checks import (
    Q0,
    application_exactness_test,
    assert_merge_refused,
    edit_tensor,
    edited,
    listed_operations,
    merge_exactness_test,
    one_clear_line_test,
    rule_corpus_test,
    with_unknown_role,
)
from peft_oracle import load_base

import adaptools
from adaptools.operations.algebra import diff

FIXTURES = ["llama-vera", "llama-vera-regen", "gpt2-vera"]

test_merge_against_peft_in_fp32_and_bf16 = merge_exactness_test(FIXTURES)
test_runtime_application_equals_peft_forward = application_exactness_test(FIXTURES)


@pytest.mark.parametrize(("key", "rank", "targets"), [(0, 8, ["q_proj", "v_proj", "down_proj"]),
                                                      (1234, 6, ["q_proj", "k_proj", "up_proj", "down_proj"]),
                                                      (7, 3, ["k_proj"])])
def test_regenerated_projections_are_peft_s(key, rank, targets):
    from peft import VeraConfig, get_peft_model

    from adaptools_plugins.lora.vera import regenerate

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(load_base(base_path("llama")), VeraConfig(r=rank, projection_prng_key=key,
                                                                         target_modules=targets))
    a, b = model.base_model.vera_A["default"], model.base_model.vera_B["default"]
    ours = regenerate(key, rank, b.shape[0], a.shape[1])
    assert torch.equal(ours[0], a) and torch.equal(ours[1], b)


def test_saved_projections_are_the_regenerated_ones():
    """The llama-vera fixture saved its projections; they are exactly what key 0 regenerates."""
    from adaptools_plugins.lora.vera import regenerate

    adapter = adaptools.load(adapter_path("llama-vera"))
    a, b = adapter.tensor("vera_A"), adapter.tensor("vera_B")
    ours = regenerate(0, 8, b.shape[0], a.shape[1])
    assert torch.equal(ours[0], a) and torch.equal(ours[1], b)


def test_regenerated_projections_need_every_layer(tmp_path):
    """The projections span the largest adapted layer: dropping the only 128-wide layers changes them, and
    with them every delta, which is why a schema round trip keeps every module."""
    adapter = adaptools.load(adapter_path("llama-vera-regen"))
    method = adaptools.plugin.get_method("vera")
    weights = dict(load_base(base_path("llama")).named_parameters())
    shapes = {m: tuple(weights[f"{m}.weight"].shape) for m in adapter.modules() if m}
    a, b = method.projections(adapter, method._dims(adapter, shapes), torch.float32)
    assert a.shape == (6, 128) and b.shape == (128, 6)
    attention = adaptools.Adapter("vera", adapter.config, adaptools.plugin.MemoryStore(
        {n: adapter.tensor(n) for n in adapter.tensor_names() if "mlp" not in n}))
    small = {m: s for m, s in shapes.items() if "mlp" not in m}
    a2, b2 = method.projections(attention, method._dims(attention, small), torch.float32)
    assert a2.shape == (6, 64) and b2.shape == (64, 6) and not torch.equal(a2, a[:, :64])


def test_regenerated_projections_follow_a_16_bit_base():
    """PEFT rounds regenerated projections to the layers' dtype, in training as in loading."""
    from peft import VeraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(load_base(base_path("llama"), torch.bfloat16),
                               VeraConfig(r=6, projection_prng_key=1234, save_projection=False,
                                          target_modules=["q_proj", "k_proj", "up_proj", "down_proj"]))
    adapter = adaptools.load(adapter_path("llama-vera-regen"))
    method = adaptools.plugin.get_method("vera")
    weights = dict(load_base(base_path("llama")).named_parameters())
    dims = method._dims(adapter, {m: tuple(weights[f"{m}.weight"].shape) for m in adapter.modules() if m})
    a, b = method.projections(adapter, dims, torch.bfloat16)
    assert torch.equal(a, model.base_model.vera_A["default"]) and torch.equal(b, model.base_model.vera_B["default"])


def test_diff_compares_tensors():
    result = diff(adaptools.load(adapter_path("llama-vera")), adaptools.load(adapter_path("llama-vera")))
    assert result.modules and all(m.difference == 0 for m in result.modules)
    assert any(m.module == "vera_A" for m in result.modules)


def test_plugins_lists_vera(cli_runner):
    assert listed_operations(cli_runner, "vera") == ["apply", "convert", "info", "merge"]


def _no_projections(t):
    t.pop("base_model.vera_A")
    t.pop("base_model.vera_B")


CORPUS = {
    "VERA001": (lambda tmp: edited(tmp, "llama-vera", {"save_projection": "yes"}), None),
    "VERA002": (lambda tmp: with_unknown_role(tmp, "llama-vera", "model.layers.0.self_attn.q_proj"), None),
    "VERA003": (lambda tmp: edited(tmp, "llama-vera", edit=edit_tensor(f"{Q0}.vera_lambda_d",
                                                                  lambda v: (v * 100).to(torch.int32))), None),
    "VERA004": (lambda tmp: edited(tmp, "llama-vera", edit=lambda t: t.pop(f"{Q0}.vera_lambda_d")), None),
    "VERA005": (lambda tmp: edited(tmp, "llama-vera-regen", {"r": 8}), None),
    "VERA006": (lambda tmp: edited(tmp, "llama-vera", {"save_projection": False}), None),
    "VERA007": (lambda tmp: edited(tmp, "llama-vera",
                                   edit=edit_tensor("base_model.vera_B", lambda v: v[:32].contiguous())), None),
    "VERA008": (lambda tmp: edited(tmp, "llama-vera", {"target_modules": ["q_proj", "v_proj"]}), None),
    "VERA009": (lambda tmp: edited(tmp, "llama-vera", edit=edit_tensor(f"{Q0}.vera_lambda_b", lambda v: v / 0)), None),
    "VERA010": (lambda tmp: edited(tmp, "llama-vera", edit=edit_tensor(f"{Q0}.vera_lambda_b", torch.zeros_like)), None),
    "VERA011": (lambda tmp: edited(tmp, "llama-vera"), "gpt2"),
    "VERA012": (lambda tmp: edited(tmp, "llama-vera",
                                   edit=edit_tensor(f"{Q0}.vera_lambda_b", lambda v: v[:48].contiguous())), "llama"),
}


test_each_defect_is_caught_by_exactly_its_rule = rule_corpus_test(CORPUS)


BAD_INPUTS = {
    "projection key is text": (lambda tmp: edited(tmp, "llama-vera-regen", {"projection_prng_key": "zero"}),
                               "projection_prng_key is 'zero'"),
    "projections dropped": (lambda tmp: edited(tmp, "llama-vera", edit=_no_projections),
                            "save_projection is true but the file holds no projections"),
    "lambda_d of the wrong length": (lambda tmp: edited(tmp, "llama-vera", edit=edit_tensor(
        f"{Q0}.vera_lambda_d", lambda v: v[:5].contiguous())), "vera_lambda_d has 5 entries"),
    "NaN in vera_A": (lambda tmp: edited(tmp, "llama-vera", edit=edit_tensor("base_model.vera_A", lambda v: v.log())),
                      "NaN/Inf"),
}

test_bad_input_is_one_clear_line = one_clear_line_test(BAD_INPUTS)


def test_merge_onto_a_base_whose_layers_do_not_fit_is_refused(tmp_path, cli_runner):
    bad = edited(tmp_path, "llama-vera", edit=edit_tensor(f"{Q0}.vera_lambda_b", lambda v: v[:48].contiguous()))
    assert_merge_refused(cli_runner, tmp_path, base_path("llama"), bad, "vera_lambda_b has 48 entries")
