"""LoKr against peft 0.21.2: merge (Linear, full and decomposed factors, every conv variant), runtime
application, conversion to LoRA, check rules, bad input. The generic suites (test_merge, test_roundtrip,
test_lora_runtime, test_check) also run over the two llama-lokr fixtures."""

from __future__ import annotations

import pytest
import torch
from conftest import adapter_path, base_path
from method_checks import (
    Q0,
    application_exactness_test,
    assert_conv_like_peft,
    assert_merge_refused,
    conv_adapter,
    conv_base,
    edit_tensor,
    edited,
    listed_operations,
    merge_exactness_test,
    one_clear_line_test,
    retained_at_rank,
    rule_corpus_test,
    saved_roles,
    with_unknown_role,
)
from peft_oracle import logits, peft_model

import adaptools
from adaptools.operations.check import check
from adaptools.operations.convert import convert_method

FIXTURES = ["llama-lokr", "llama-lokr-decomposed"]
D0 = "base_model.model.model.layers.0.mlp.down_proj"

test_merge_is_bit_exact_against_peft_in_fp32_and_bf16 = merge_exactness_test(FIXTURES)
test_runtime_application_equals_peft_forward = application_exactness_test(FIXTURES)


@pytest.mark.parametrize(("r", "effective"), [(3, False), (1, False), (1, True)])
def test_conv_layers_merge_and_apply_like_peft(r, effective, tmp_path):
    """Full and low-rank right factors on Conv2d 3×3, Conv2d 1×1, Conv1d k3 and Linear; the CP form (lokr_t2)."""
    from peft import LoKrConfig

    base = conv_base(tmp_path / "base")
    targets = ["conv", "pointwise", "head"] + ([] if effective else ["seq"])  # see the Conv1d test below
    config = LoKrConfig(r=r, alpha=2, use_effective_conv2d=effective, target_modules=targets)
    adapter = conv_adapter(base, config, tmp_path / "adapter")
    assert ("lokr_t2" in saved_roles(adapter)) == effective
    assert_conv_like_peft(base, adapter, tmp_path / "merged")


def test_effective_form_on_conv1d_is_refused_as_peft_cannot_compute_it(tmp_path, cli_runner):
    from method_checks import CONV_INPUT, conv_model
    from peft import LoKrConfig, PeftModel

    base = conv_base(tmp_path / "base")
    adapter = conv_adapter(base, LoKrConfig(r=1, alpha=2, use_effective_conv2d=True, target_modules=["seq"]),
                           tmp_path / "adapter")
    with pytest.raises(RuntimeError, match="view size"):  # peft's own forward fails on it
        PeftModel.from_pretrained(conv_model(base), adapter)(CONV_INPUT)
    assert_merge_refused(cli_runner, tmp_path, base, adapter, "Conv1d")
    with pytest.raises(adaptools.UnsupportedOperationError, match="Conv1d"):
        adaptools.plugin.get_method("lokr").apply(adaptools.load(adapter), conv_model(base)).__enter__()


@pytest.mark.parametrize("factor", [-1, 2, 3, 4, 8, 0])
def test_factorization_is_peft_s(factor):
    from peft.tuners.lokr.layer import factorization as theirs

    from adaptools_plugins.lycoris.lokr import factorization

    for n in range(1, 300):
        assert factorization(n, factor) == theirs(n, factor), (n, factor)


@pytest.mark.parametrize("name", FIXTURES)
def test_low_rank_factors_are_the_delta(name):
    adapter = adaptools.load(adapter_path(name))
    method = adaptools.plugin.get_method("lokr")
    for module, f in method.low_rank(adapter).items():
        roles = adapter.modules()[module]
        delta = method.delta(method._tensors(adapter, roles, dtype=torch.float64), 1.0)
        torch.testing.assert_close(f.b @ f.a, delta * method.scaling(adapter.config, module), rtol=1e-12,
                                   atol=1e-15)


def test_convert_to_lora_exact_and_truncated(tmp_path, cli_runner):
    out, _ = convert_method(adapter_path("llama-lokr"), tmp_path / "lora", to_method="lora")
    lora = adaptools.load(out)
    assert lora.method == "lora"
    assert lora.info("model.layers.0.self_attn.q_proj.lora_A").shape == (64, 64)  # two full 8×8 factors
    assert lora.info("model.layers.0.mlp.down_proj.lora_A").shape == (32, 128)  # full 8×8, rank-4 right factor
    expected = logits(peft_model(base_path("llama"), adapter_path("llama-lokr")))
    torch.testing.assert_close(logits(peft_model(base_path("llama"), out)), expected, rtol=0, atol=1e-5)
    retained = retained_at_rank(cli_runner, "llama-lokr", tmp_path / "r8", 8)
    assert len(retained) == 4 and all(0 < v < 1 for v in retained.values())
    assert adaptools.load(tmp_path / "r8").info("model.layers.0.self_attn.q_proj.lora_A").shape == (8, 64)


def test_plugins_lists_lokr(cli_runner):
    assert listed_operations(cli_runner, "lokr") == ["algebra", "apply", "convert", "info", "merge", "plain"]


def _narrow(t):
    t[f"{Q0}.lokr_w2"] = t[f"{Q0}.lokr_w2"][:, :4].contiguous()


def _full_w2(t):
    t[f"{D0}.lokr_w2"] = t.pop(f"{D0}.lokr_w2_a") @ t.pop(f"{D0}.lokr_w2_b")


def _both_forms(t):
    t[f"{Q0}.lokr_w1_a"] = torch.ones(8, 2)
    t[f"{Q0}.lokr_w1_b"] = torch.ones(2, 8)


CORPUS = {
    "LOKR001": (lambda tmp: edited(tmp, "llama-lokr", {"decompose_both": "no"}), None),
    "LOKR002": (lambda tmp: with_unknown_role(tmp, "llama-lokr", "model.layers.0.self_attn.q_proj"), None),
    "LOKR003": (lambda tmp: edited(tmp, "llama-lokr",
                                   edit=edit_tensor(f"{Q0}.lokr_w1", lambda v: (v * 100).to(torch.int8))), None),
    "LOKR004": (lambda tmp: edited(tmp, "llama-lokr", edit=lambda t: t.pop(f"{D0}.lokr_w2_b")), None),
    "LOKR005": (lambda tmp: edited(tmp, "llama-lokr",
                                   edit=edit_tensor(f"{D0}.lokr_w2_a", lambda v: v[:, :3].contiguous())), None),
    # r = 16 makes the scaling alpha/16, and PEFT would have saved down_proj's right factor full
    "LOKR006": (lambda tmp: edited(tmp, "llama-lokr", {"r": 16}, edit=_full_w2), None),
    "LOKR007": (lambda tmp: edited(tmp, "llama-lokr", {"decompose_factor": 4}), None),
    "LOKR008": (lambda tmp: edited(tmp, "llama-lokr", {"target_modules": ["q_proj"]}), None),
    "LOKR009": (lambda tmp: edited(tmp, "llama-lokr", edit=edit_tensor(f"{Q0}.lokr_w2", lambda v: v / 0)), None),
    "LOKR010": (lambda tmp: edited(tmp, "llama-lokr", edit=edit_tensor(f"{Q0}.lokr_w1", torch.zeros_like)), None),
    "LOKR011": (lambda tmp: edited(tmp, "llama-lokr"), "gpt2"),
    "LOKR012": (lambda tmp: edited(tmp, "llama-lokr", edit=_narrow), "llama"),
}


test_each_defect_is_caught_by_exactly_its_rule = rule_corpus_test(CORPUS)


def test_a_wrong_r_alone_is_caught_where_it_shows(tmp_path):
    """r = 8 instead of 4 halves the scaling; down_proj's rank-4 right factor gives it away."""
    report = check(edited(tmp_path, "llama-lokr", {"r": 8}))
    assert {f.rule for f in report.findings} == {"LOKR006"}


BAD_INPUTS = {
    "full and decomposed": (lambda tmp: edited(tmp, "llama-lokr", edit=_both_forms),
                            "lokr_w1 and lokr_w1_a, lokr_w1_b are both saved"),
    "missing factor": (CORPUS["LOKR004"][0], "neither lokr_w2 nor both"),
    "inconsistent ranks": (CORPUS["LOKR005"][0], "factor shapes disagree"),
    "decompose_factor is text": (lambda tmp: edited(tmp, "llama-lokr", {"decompose_factor": "four"}),
                                 "decompose_factor is 'four'"),
}

test_bad_input_is_one_clear_line = one_clear_line_test(BAD_INPUTS)
