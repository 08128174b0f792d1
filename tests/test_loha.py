"""LoHa against peft 0.21.2: merge (Linear and every conv variant), runtime application, conversion to LoRA,
check rules, bad input. The generic suites (test_merge, test_roundtrip, test_lora_runtime, test_check) also run
over the llama-loha fixture (rank and alpha patterns)."""

from __future__ import annotations

import pytest
import torch
from conftest import adapter_path, base_path
from method_checks import (
    Q0,
    assert_conv_like_peft,
    assert_merge_refused,
    compare_apply,
    compare_merge_fp32_and_bf16,
    conv_adapter,
    conv_base,
    edit_tensor,
    edited,
    listed_operations,
    one_clear_line_test,
    retained_at_rank,
    rule_corpus_test,
    saved_roles,
    with_unknown_role,
)
from peft_oracle import logits, peft_model

import adaptools
from adaptools.operations.convert import convert_method

NAME = "llama-loha"


def test_merge_is_bit_exact_against_peft_in_fp32_and_bf16(bf16_base, tmp_path):
    fp32, bf16 = compare_merge_fp32_and_bf16(NAME, bf16_base, tmp_path)
    assert fp32["ulps"] == 0 and bf16["ulps"] == 0, (fp32, bf16)
    assert fp32["changed"] == 8


def test_runtime_application_equals_peft_forward():
    assert compare_apply(base_path("llama"), adapter_path(NAME)) == 0.0


@pytest.mark.parametrize("effective", [False, True])
def test_conv_layers_merge_and_apply_like_peft(effective, tmp_path):
    """Conv2d 3×3 (flattened, or the effective CP form with hada_t1/t2), Conv2d 1×1, Conv1d k3, Linear."""
    from peft import LoHaConfig

    base = conv_base(tmp_path / "base")
    config = LoHaConfig(r=3, alpha=5, use_effective_conv2d=effective,
                        target_modules=["conv", "pointwise", "seq", "head"])
    adapter = conv_adapter(base, config, tmp_path / "adapter")
    assert ("hada_t1" in saved_roles(adapter)) == effective
    assert_conv_like_peft(base, adapter, tmp_path / "merged")


def test_low_rank_factors_are_the_delta():
    adapter = adaptools.load(adapter_path(NAME))
    method = adaptools.plugin.get_method("loha")
    factors = method.low_rank(adapter)
    module = "model.layers.0.self_attn.q_proj"
    roles = adapter.modules()[module]
    delta = method.delta(method._tensors(adapter, roles, dtype=torch.float64), 2.0)
    assert factors[module].rank == 16
    torch.testing.assert_close(factors[module].b @ factors[module].a, delta, rtol=1e-12, atol=1e-15)


def test_convert_to_lora_exact_and_truncated(tmp_path, cli_runner):
    out, retained = convert_method(adapter_path(NAME), tmp_path / "lora", to_method="lora")
    assert retained is None
    lora = adaptools.load(out)
    assert lora.method == "lora" and lora.info("model.layers.0.self_attn.q_proj.lora_A").shape == (16, 64)
    expected = logits(peft_model(base_path("llama"), adapter_path(NAME)))
    torch.testing.assert_close(logits(peft_model(base_path("llama"), out)), expected, rtol=0, atol=1e-5)
    retained = retained_at_rank(cli_runner, NAME, tmp_path / "r4", 4)
    # down_proj has rank 2, so its delta has rank 4 and nothing is lost there
    assert len(retained) == 8 and all(0 < v < 1 for m, v in retained.items() if "down_proj" not in m)
    assert all(v == pytest.approx(1) for m, v in retained.items() if "down_proj" in m)
    truncated = adaptools.load(tmp_path / "r4")
    assert truncated.info("model.layers.0.self_attn.q_proj.lora_A").shape == (4, 64)
    # rank 4 of a rank-16 delta: what is kept is the best rank-4 part, and peft runs it
    logits(peft_model(base_path("llama"), tmp_path / "r4"))
    energy = cli_runner("convert", adapter_path(NAME), tmp_path / "e", "--to", "lora", "--energy", "0.999")
    assert energy.exit_code == 0 and "lowest retained energy" in energy.stdout


def test_diff_is_exact_from_factors():
    from adaptools.operations.algebra import diff

    same = diff(adaptools.load(adapter_path(NAME)), adaptools.load(adapter_path(NAME)))
    assert len(same.modules) == 8 and all(m.difference == 0 for m in same.modules)


def test_plugins_lists_loha(cli_runner):
    assert listed_operations(cli_runner, "loha") == ["algebra", "apply", "convert", "info", "merge", "plain"]


def _narrow_inputs(t):
    for role in ("hada_w1_b", "hada_w2_b"):
        t[f"{Q0}.{role}"] = t[f"{Q0}.{role}"][:, :32].contiguous()


CORPUS = {
    "LOHA001": (lambda tmp: edited(tmp, NAME, {"r": "4"}), None),
    "LOHA002": (lambda tmp: with_unknown_role(tmp, NAME, "model.layers.0.self_attn.q_proj"), None),
    "LOHA003": (lambda tmp: edited(tmp, NAME, edit=edit_tensor(f"{Q0}.hada_w1_a", lambda v: (v * 100).to(torch.int32))),
                None),
    "LOHA004": (lambda tmp: edited(tmp, NAME, edit=lambda t: t.pop(f"{Q0}.hada_w2_b")), None),
    "LOHA005": (lambda tmp: edited(tmp, NAME, edit=edit_tensor(f"{Q0}.hada_w2_a", lambda v: v[:, :3].contiguous())),
                None),
    "LOHA006": (lambda tmp: edited(tmp, NAME, {"r": 8}), None),
    "LOHA007": (lambda tmp: edited(tmp, NAME, {"target_modules": ["q_proj", "v_proj", "o_proj"]}), None),
    "LOHA008": (lambda tmp: edited(tmp, NAME, edit=edit_tensor(f"{Q0}.hada_w1_b", lambda v: v / 0)), None),
    "LOHA009": (lambda tmp: edited(tmp, NAME, edit=edit_tensor(f"{Q0}.hada_w2_b", torch.zeros_like)), None),
    "LOHA010": (lambda tmp: edited(tmp, NAME), "gpt2"),
    "LOHA011": (lambda tmp: edited(tmp, NAME, edit=_narrow_inputs), "llama"),
}


test_each_defect_is_caught_by_exactly_its_rule = rule_corpus_test(CORPUS)


BAD_INPUTS = {
    "alpha is text": (lambda tmp: edited(tmp, NAME, {"alpha": "eight"}), "alpha is 'eight'"),
    "rank_pattern is a list": (lambda tmp: edited(tmp, NAME, {"rank_pattern": ["down_proj", 2]}), "rank_pattern is"),
    "missing factor": (CORPUS["LOHA004"][0], "lacks hada_w2_b"),
    "inconsistent ranks": (CORPUS["LOHA005"][0], "factor shapes disagree"),
    "Inf in a factor": (CORPUS["LOHA008"][0], "NaN/Inf"),
}

test_bad_input_is_one_clear_line = one_clear_line_test(BAD_INPUTS)


def test_merge_onto_a_smaller_model_is_refused_before_writing(tmp_path, cli_runner):
    bad = edited(tmp_path, NAME, edit=_narrow_inputs)
    # the load-time checks pass (the factors agree with each other); the base does not fit
    assert_merge_refused(cli_runner, tmp_path, base_path("llama"), bad, "do not fit base")
