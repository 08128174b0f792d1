"""AdaLoRA against peft 0.21.2: merge, runtime application, conversion to plain LoRA, check rules, bad input.

The fixtures cover full rank (llama-adalora), pruned ranks with a rank-0 module (llama-adalora-pruned:
PEFT keeps ranknum = init_r) and GPT-2 Conv1D (gpt2-adalora). The generic suites (test_merge, test_roundtrip,
test_lora_runtime, test_check) also run over them.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import adapter_path, base_path
from method_checks import (
    Q0,
    application_exactness_test,
    assert_conv_like_peft,
    assert_merge_refused,
    compare_merge,
    compare_merge_fp32_and_bf16,
    conv_adapter,
    conv_base,
    edit_tensor,
    edited,
    listed_operations,
    merged_state,
    one_clear_line_test,
    retained_at_rank,
    rule_corpus_test,
    truncated,
    with_unknown_role,
)
from peft_oracle import load_base, logits, peft_model

import adaptools
from adaptools import MergeInput, merge
from adaptools.operations.algebra import diff
from adaptools.operations.check import check
from adaptools.operations.convert import convert_method

FIXTURES = ["llama-adalora", "llama-adalora-pruned", "gpt2-adalora"]


@pytest.mark.parametrize("name", FIXTURES)
def test_merge_is_bit_exact_against_peft_in_fp32_and_bf16(name, bf16_base, tmp_path):
    fp32, bf16 = compare_merge_fp32_and_bf16(name, bf16_base, tmp_path)
    assert fp32["ulps"] == 0, fp32
    if name != "llama-adalora-pruned":
        assert bf16["ulps"] == 0, bf16
        return
    # PEFT quirk (docs/methods.md, AdaLoRA): resizing to the rank_pattern re-creates the factors in the base's
    # dtype before the file is loaded, so on a bf16 base PEFT merges bf16-rounded factors. We keep the saved
    # fp32 factors; the merged weights then differ by rounding only, and equal PEFT's bit for bit when the
    # factors are rounded first.
    assert 0 < bf16["max_abs"] <= 2.5e-4, bf16
    rounded = edited(tmp_path, name, edit=lambda t: t.update({k: v.bfloat16().float() for k, v in t.items()}))
    assert compare_merge(bf16_base("llama"), rounded, tmp_path / "rounded", torch.bfloat16)["ulps"] == 0


test_runtime_application_equals_peft_forward = application_exactness_test(FIXTURES)


def test_ranknum_stays_init_r_after_pruning():
    from adaptools_plugins.lora.adalora import module_scales

    adapter = adaptools.load(adapter_path("llama-adalora-pruned"))
    assert module_scales(adapter.config, "model.layers.0.self_attn.q_proj") == (3, 12, 6.0)
    assert module_scales(adapter.config, "model.layers.1.self_attn.k_proj") == (0, 12, 0.0)
    assert adapter.info("model.layers.1.self_attn.k_proj.lora_A").shape == (0, 64)


def test_conv2d_merge_and_application_equal_peft(tmp_path):
    from peft import AdaLoraConfig

    base = conv_base(tmp_path / "base")
    config = AdaLoraConfig(init_r=3, lora_alpha=6, total_step=10, target_modules=["conv", "pointwise", "head"])
    adapter = conv_adapter(base, config, tmp_path / "adapter")
    assert_conv_like_peft(base, adapter, tmp_path / "merged")


@pytest.mark.parametrize("name", FIXTURES)
def test_convert_to_lora_is_exact_and_peft_loads_it(name, tmp_path):
    arch = name.split("-")[0]
    out, retained = convert_method(adapter_path(name), tmp_path / "lora", to_method="lora")
    assert retained is None
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config.get("use_rslora", False) is False
    lora = adaptools.load(out)
    assert lora.method == "lora"
    source = adaptools.load(adapter_path(name))
    # the same ranks, module by module; E folded into A exactly (A ⊙ E is what PEFT computes too)
    for module, roles in source.modules().items():
        rank = source.info(roles["lora_A"]).shape[0]
        if rank:
            a = source.tensor(roles["lora_A"]) * source.tensor(roles["lora_E"])
            assert torch.equal(lora.tensor(f"{module}.lora_A"), a)
        else:
            assert f"{module}.lora_A" not in lora.tensor_names()
    expected = logits(peft_model(base_path(arch), adapter_path(name)))
    got = logits(peft_model(base_path(arch), out))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # merged weights of the LoRA against PEFT's AdaLoRA merge: the scaling is folded into B, so the products
    # round differently, by a few fp32 ulps of the delta
    merge(base_path(arch), [MergeInput(lora)], tmp_path / "merged")
    theirs = peft_model(base_path(arch), adapter_path(name)).merge_and_unload().state_dict()
    original = load_base(base_path(arch)).state_dict()
    for key, value in merged_state(tmp_path / "merged").items():
        delta = (theirs[key] - original[key]).abs().max()
        assert (value - theirs[key]).abs().max() <= 8 * torch.finfo(torch.float32).eps * max(delta, 1e-30), key


def test_convert_to_lora_with_rank_reports_retained_energy(tmp_path, cli_runner):
    retained = retained_at_rank(cli_runner, "llama-adalora", tmp_path / "r2", 2)
    assert len(retained) == 6 and all(0 < v < 1 for v in retained.values())
    assert adaptools.load(tmp_path / "r2").info("model.layers.0.self_attn.q_proj.lora_A").shape == (2, 64)
    text = cli_runner("convert", adapter_path("llama-adalora"), tmp_path / "e", "--to", "lora", "--energy", "0.9")
    assert text.exit_code == 0 and "lowest retained energy" in text.stdout
    wrong = cli_runner("convert", adapter_path("llama-adalora"), tmp_path / "x", "--to", "peft", "--rank", "2")
    assert wrong.exit_code == 2


def test_convert_to_another_method_is_refused(tmp_path, cli_runner):
    result = cli_runner("convert", adapter_path("llama-adalora"), tmp_path / "x", "--to", "prefix_tuning")
    assert result.exit_code == 2 and "converts to 'lora'" in result.stderr
    assert not (tmp_path / "x").exists()


def test_diff_against_its_lora_form_is_rounding_only(tmp_path):
    out, _ = convert_method(adapter_path("llama-adalora"), tmp_path / "lora", to_method="lora")
    result = diff(adaptools.load(adapter_path("llama-adalora")), adaptools.load(out))
    assert len(result.modules) == 6
    assert all(m.relative < 1e-6 for m in result.modules)
    same = diff(adaptools.load(adapter_path("llama-adalora")), adaptools.load(adapter_path("llama-adalora")))
    assert all(m.difference == 0 for m in same.modules)


def test_plugins_lists_adalora(cli_runner):
    assert listed_operations(cli_runner, "adalora") == ["algebra", "apply", "convert", "info", "merge", "plain"]


CORPUS = {
    "ADALORA001": (lambda tmp: edited(tmp, "llama-adalora", {"init_r": "6"}), None),
    "ADALORA002": (lambda tmp: with_unknown_role(tmp, "llama-adalora", "model.layers.0.self_attn.q_proj"), None),
    "ADALORA003": (lambda tmp: edited(tmp, "llama-adalora",
                                      edit=edit_tensor(f"{Q0}.lora_A", lambda v: v.to(torch.int32))), None),
    "ADALORA004": (lambda tmp: edited(tmp, "llama-adalora", edit=lambda t: t.pop(f"{Q0}.lora_E")), None),
    "ADALORA005": (lambda tmp: edited(tmp, "llama-adalora",
                                      edit=edit_tensor(f"{Q0}.lora_E", lambda v: v[:4].contiguous())), None),
    "ADALORA006": (lambda tmp: edited(tmp, "llama-adalora", {"init_r": 4}), None),
    "ADALORA007": (lambda tmp: edited(tmp, "llama-adalora", {"target_modules": ["q_proj", "v_proj"]}), None),
    "ADALORA008": (lambda tmp: edited(tmp, "llama-adalora", edit=edit_tensor(f"{Q0}.lora_B", lambda v: v / 0)), None),
    "ADALORA009": (lambda tmp: edited(tmp, "llama-adalora", edit=edit_tensor(f"{Q0}.lora_E", torch.zeros_like)), None),
    "ADALORA010": (lambda tmp: edited(tmp, "gpt2-adalora"), "llama"),
    "ADALORA011": (lambda tmp: edited(tmp, "llama-adalora",
                                      edit=edit_tensor(f"{Q0}.lora_A", lambda v: v[:, :32].contiguous())), "llama"),
}


test_each_defect_is_caught_by_exactly_its_rule = rule_corpus_test(CORPUS)


def test_pruned_rank_pattern_of_the_wrong_length_is_a_config_mismatch(tmp_path):
    config = json.loads((adapter_path("llama-adalora-pruned") / "adapter_config.json").read_text())
    pattern = config["rank_pattern"]
    pattern["model.layers.0.self_attn.q_proj.lora_E"] = [True, False, True, False, True]
    report = check(edited(tmp_path, "llama-adalora-pruned", {"rank_pattern": pattern}))
    assert {f.rule for f in report.findings} == {"ADALORA006"}


BAD_INPUTS = {
    "lora_alpha is text": (lambda tmp: edited(tmp, "llama-adalora", {"lora_alpha": "eight"}), "lora_alpha is 'eight'"),
    "rank_pattern is not masks": (lambda tmp: edited(tmp, "llama-adalora", {"rank_pattern": {"x.lora_E": 3}}),
                                  "not a list of booleans"),
    "missing lora_E": (lambda tmp: edited(tmp, "llama-adalora", edit=lambda t: t.pop(f"{Q0}.lora_E")), "not lora_E"),
    "NaN in lora_A": (lambda tmp: edited(tmp, "llama-adalora", edit=edit_tensor(
        f"{Q0}.lora_A", lambda v: v.index_fill(0, torch.tensor([1]), float("nan")))), "NaN/Inf"),
    "truncated weights": (lambda tmp: truncated(tmp, "llama-adalora"), "adapter_model.safetensors"),
}

test_bad_input_is_one_clear_line = one_clear_line_test(BAD_INPUTS)


def test_merge_onto_the_wrong_base_is_refused_before_writing(tmp_path, cli_runner):
    assert_merge_refused(cli_runner, tmp_path, base_path("gpt2"), adapter_path("llama-adalora"), "model.layers.0",
                         "--ignore-base-mismatch")
