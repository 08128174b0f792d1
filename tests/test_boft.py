"""BOFT against peft 0.21.2: merge, runtime application (with biases), butterfly factors beyond one (peft's
CUDA kernel path, run on the CPU with a stand-in for its block-diagonal kernel), check rules, bad input. The
generic suites (test_merge, test_roundtrip, test_lora_runtime, test_check) also run over the three fixtures."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import adapter_path, base_path
from method_checks import (
    Q0,
    application_exactness_test,
    compare_merge,
    compare_merge_fp32_and_bf16,
    edit_tensor,
    edited,
    listed_operations,
    one_clear_line_test,
    rule_corpus_test,
    with_unknown_role,
)
from peft_oracle import load_base, logits, peft_model

import adaptools
from adaptools.operations.check import check

FIXTURES = ["llama-boft", "llama-boft-blocks", "qwen2-boft"]


@pytest.mark.parametrize("name", FIXTURES)
def test_merge_is_bit_exact_against_peft_in_fp32_and_bf16(name, bf16_base, tmp_path):
    if name.startswith("qwen2"):  # the qwen2 base is stored in bf16 (test_merge compares that one)
        bf16 = compare_merge(base_path("qwen2"), adapter_path(name), tmp_path / "bf16", torch.bfloat16)
        assert bf16["ulps"] == 0, bf16
        return
    fp32, bf16 = compare_merge_fp32_and_bf16(name, bf16_base, tmp_path)
    assert fp32["ulps"] == 0 and bf16["ulps"] == 0, (fp32, bf16)


test_runtime_application_equals_peft_forward = application_exactness_test(FIXTURES)


def test_butterfly_permutation_is_peft_s():
    from peft.tuners.boft.layer import BOFTLayer

    from adaptools_plugins.orthogonal.boft import butterfly_permutation, permutation_matrix

    for n, blocks, half, extra in [(64, 16, 2, 1), (64, 8, 2, 1), (64, 4, 4, 2), (128, 8, 4, 2), (64, 16, 2, 0),
                                   (96, 12, 2, 1), (64, 2, 16, 1)]:
        theirs = BOFTLayer.block_butterfly_perm(None, n, blocks, half, extra)
        ours = butterfly_permutation(n, blocks, half, extra)
        assert torch.equal(ours, theirs)
        assert torch.equal(permutation_matrix(ours), BOFTLayer.perm2mat(None, theirs))


class FakeBlockDiagKernel:
    """peft's fbd_cuda forward, on the CPU: [N, D, H, H] -> [N, D·H, D·H] block-diagonal (pure data movement,
    as the kernel's source does it)."""

    @staticmethod
    def forward(x):
        return [torch.stack([torch.block_diag(*torch.unbind(x[i])) for i in range(x.shape[0])])]


@pytest.mark.parametrize(("factors", "config"), [(2, {"boft_block_size": 4}), (3, {"boft_block_size": 2}),
                                                  (2, {"boft_block_num": 8, "boft_block_size": 0})])
def test_several_butterfly_factors_merge_and_apply_as_peft_s_kernel_path(factors, config, tmp_path, monkeypatch):
    import peft.tuners.boft.layer as boft_layer
    from method_checks import merged_state, ulps
    from peft import BOFTConfig, PeftModel, get_peft_model

    from adaptools import MergeInput, merge

    monkeypatch.setattr(boft_layer, "_FBD_CUDA", FakeBlockDiagKernel())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(load_base(base_path("llama")), BOFTConfig(
            boft_n_butterfly_factor=factors, target_modules=["q_proj", "down_proj"], **config))
    gen = torch.Generator().manual_seed(factors)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_((1 if "boft_s" in name else 0) + 0.1 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(tmp_path / "adapter")
    adapter = adaptools.load(tmp_path / "adapter")
    assert adapter.info("model.layers.0.self_attn.q_proj.boft_R").shape[0] == factors
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PeftModel.from_pretrained(load_base(base_path("llama")), tmp_path / "adapter").eval()
    expected = logits(reference)
    merge(base_path("llama"), [MergeInput(adapter)], tmp_path / "out")
    theirs = reference.merge_and_unload().state_dict()
    assert max(ulps(v, theirs[k]) for k, v in merged_state(tmp_path / "out").items()) == 0
    base = load_base(base_path("llama"))
    with adaptools.plugin.get_method("boft").apply(adapter, base):
        assert torch.equal(logits(base), expected)


def test_plugins_lists_boft(cli_runner):
    assert listed_operations(cli_runner, "boft") == ["apply", "convert", "info", "merge"]


def _identity(t):
    t[f"{Q0}.boft_R"] = torch.zeros_like(t[f"{Q0}.boft_R"])
    t[f"{Q0}.boft_s"] = torch.ones_like(t[f"{Q0}.boft_s"])


CORPUS = {
    "BOFT001": (lambda tmp: edited(tmp, "llama-boft", {"boft_block_size": 4.0}), None),
    "BOFT002": (lambda tmp: with_unknown_role(tmp, "llama-boft", "model.layers.0.self_attn.q_proj"), None),
    "BOFT003": (lambda tmp: edited(tmp, "llama-boft", edit=edit_tensor(f"{Q0}.boft_s", lambda v: v.to(torch.int32))),
                None),
    "BOFT004": (lambda tmp: edited(tmp, "llama-boft", edit=lambda t: t.pop(f"{Q0}.boft_s")), None),
    "BOFT005": (lambda tmp: edited(tmp, "llama-boft",
                                   edit=edit_tensor(f"{Q0}.boft_R", lambda v: v[..., :3].contiguous())), None),
    "BOFT006": (lambda tmp: edited(tmp, "llama-boft", {"boft_block_num": 16}), None),
    "BOFT007": (lambda tmp: edited(tmp, "llama-boft", {"boft_block_size": 8}), None),
    "BOFT008": (lambda tmp: edited(tmp, "llama-boft", {"target_modules": ["q_proj"]}), None),
    "BOFT009": (lambda tmp: edited(tmp, "llama-boft", edit=edit_tensor(f"{Q0}.boft_s", lambda v: v / 0)), None),
    "BOFT010": (lambda tmp: edited(tmp, "llama-boft", edit=_identity), None),
    "BOFT011": (lambda tmp: edited(tmp, "llama-boft"), "gpt2"),
    "BOFT012": (lambda tmp: edited(tmp, "llama-boft", edit=edit_tensor(f"{Q0}.boft_s", lambda v: v[:32].contiguous())),
                "llama"),
}

test_each_defect_is_caught_by_exactly_its_rule = rule_corpus_test(CORPUS)


def test_butterfly_factor_counts_peft_could_not_have_made_are_caught(tmp_path):
    three = edited(tmp_path, "llama-boft", {"boft_n_butterfly_factor": 3},
                   edit=edit_tensor(f"{Q0}.boft_R", lambda v: v.repeat(2, 1, 1, 1).contiguous()))
    report = check(three)
    assert {f.rule for f in report.findings} == {"BOFT007"}
    assert "2 butterfly factors" in report.findings[0].message


BAD_INPUTS = {
    "block size is text": (lambda tmp: edited(tmp, "llama-boft", {"boft_block_size": "four"}),
                           "boft_block_size is 'four'"),
    "both block size and count": (CORPUS["BOFT006"][0], "boft_block_size is 4 and boft_block_num is 16"),
    "scale missing": (CORPUS["BOFT004"][0], "has boft_R only"),
    "NaN in boft_R": (lambda tmp: edited(tmp, "llama-boft", edit=edit_tensor(f"{Q0}.boft_R", lambda v: v.log())),
                      "NaN/Inf"),
}

test_bad_input_is_one_clear_line = one_clear_line_test(BAD_INPUTS)


def test_merged_model_keeps_the_biases_and_matches_the_unmerged_logits(tmp_path):
    from method_checks import merged_state

    from adaptools import MergeInput, merge

    merge(base_path("qwen2"), [MergeInput(adaptools.load(adapter_path("qwen2-boft")))], tmp_path / "out",
          dtype="fp32")
    merged = merged_state(tmp_path / "out")
    original = load_base(base_path("qwen2")).state_dict()
    assert torch.equal(merged["model.layers.0.self_attn.k_proj.bias"], original["model.layers.0.self_attn.k_proj.bias"])
    expected = logits(peft_model(base_path("qwen2"), adapter_path("qwen2-boft")))
    torch.testing.assert_close(logits(load_base(tmp_path / "out")), expected, rtol=1e-4, atol=1e-4)
