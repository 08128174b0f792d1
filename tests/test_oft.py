"""OFT against peft 0.21.2: rotations (truncated series, exact Cayley, COFT, shared blocks), merge alone and
stacked, runtime application, check rules, bad input. The generic suites (test_merge, test_roundtrip,
test_lora_runtime, test_check) also run over the three fixtures."""

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
    merged_state,
    one_clear_line_test,
    rule_corpus_test,
    ulps,
    with_unknown_role,
)
from peft_oracle import load_base, peft_model

import adaptools
from adaptools import MergeInput, merge
from adaptools.operations.check import check

FIXTURES = ["llama-oft", "llama-oft-coft", "llama-oft-shared"]

test_merge_is_bit_exact_against_peft_in_fp32_and_bf16 = merge_exactness_test(FIXTURES)
test_runtime_application_equals_peft_forward = application_exactness_test(FIXTURES)


def test_stacked_adapters_compose_in_order_as_peft_merges_them(tmp_path):
    """Two rotations of q_proj: W R1ᵀ R2ᵀ, in the order given, as merge_and_unload(adapter_names=[...])."""
    first, second = adapter_path("llama-oft"), adapter_path("llama-oft-shared")
    merge(base_path("llama"), [MergeInput(adaptools.load(first)), MergeInput(adaptools.load(second))],
          tmp_path / "out")
    ours = merged_state(tmp_path / "out")
    model = peft_model(base_path("llama"), first)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.load_adapter(second, adapter_name="other")
    theirs = model.merge_and_unload(adapter_names=["default", "other"]).state_dict()
    assert max(ulps(v, theirs[k]) for k, v in ours.items()) == 0
    merge(base_path("llama"), [MergeInput(adaptools.load(second)), MergeInput(adaptools.load(first))],
          tmp_path / "reversed")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged_state(tmp_path / "reversed")[q], ours[q])  # rotations do not commute


@pytest.mark.parametrize(("neumann", "terms"), [(True, 1), (True, 2), (True, 3), (True, 5), (True, 8), (False, 5)])
def test_rotations_are_peft_s(neumann, terms):
    from peft.tuners.oft.layer import OFTRotationModule

    from adaptools_plugins.orthogonal.oft import cayley, project

    gen = torch.Generator().manual_seed(terms)
    module = OFTRotationModule(3, 28, 8, 24, coft=True, eps=1e-2)
    vec = 0.1 * torch.randn(3, 28, generator=gen)
    assert torch.equal(cayley(vec, 8, neumann, terms), module._cayley_batch(vec, 8, neumann, terms))
    assert torch.equal(project(vec, 8, 1e-2), module._project_batch(vec, eps=1e-2))


def test_block_size_adjustment_is_peft_s():
    from peft.tuners.oft.layer import OFTLayer

    from adaptools_plugins.orthogonal.oft import adjust

    for n in range(2, 200):
        for wanted in range(1, n + 3):
            if n % wanted or wanted > n:
                assert adjust(n, wanted) == OFTLayer.adjust_oft_parameters(None, n, wanted), (n, wanted)


def test_weighted_merge_is_refused(tmp_path, cli_runner):
    assert_merge_refused(cli_runner, tmp_path, base_path("llama"), adapter_path("llama-oft"), "no weighted form",
                         "--weight", "0.5")


def test_conv_and_embedding_layers_are_refused_with_the_reason(tmp_path):
    from method_checks import conv_adapter, conv_base
    from peft import OFTConfig

    base = conv_base(tmp_path / "base")
    adapter = conv_adapter(base, OFTConfig(oft_block_size=4, target_modules=["conv"]), tmp_path / "adapter")
    with pytest.raises(adaptools.UnsupportedOperationError, match="conv layers are not supported"):
        merge(base, [MergeInput(adaptools.load(adapter))], tmp_path / "out")
    loaded = adaptools.load(adapter_path("llama-oft"))
    tensors = {n: loaded.tensor(n) for n in loaded.tensor_names()}
    tensors["model.embed_tokens.oft_embedding_R"] = torch.zeros(8, 28)
    odd = adaptools.Adapter("oft", {**loaded.config, "target_modules": None}, adaptools.plugin.MemoryStore(tensors))
    with pytest.raises(adaptools.UnsupportedOperationError, match="embedding"):
        merge(base_path("llama"), [MergeInput(odd)], tmp_path / "out2")


def test_plugins_lists_oft(cli_runner):
    assert listed_operations(cli_runner, "oft") == ["apply", "convert", "info", "merge"]


def _legacy(t):
    t[f"{Q0}.oft_r"] = t.pop(f"{Q0}.oft_R.weight")


CORPUS = {
    "OFT001": (lambda tmp: edited(tmp, "llama-oft", {"coft": "no"}), None),
    "OFT002": (lambda tmp: with_unknown_role(tmp, "llama-oft", "model.layers.0.self_attn.q_proj"), None),
    "OFT003": (lambda tmp: edited(tmp, "llama-oft", edit=edit_tensor(f"{Q0}.oft_R.weight",
                                                                     lambda v: (v * 100).to(torch.int16))), None),
    "OFT004": (lambda tmp: edited(tmp, "llama-oft",
                                  edit=edit_tensor(f"{Q0}.oft_R.weight", lambda v: v[:, :27].contiguous())), None),
    "OFT005": (lambda tmp: edited(tmp, "llama-oft", {"r": 8}), None),
    "OFT006": (lambda tmp: edited(tmp, "llama-oft", {"oft_block_size": 16}), None),
    "OFT007": (lambda tmp: edited(tmp, "llama-oft", {"target_modules": ["q_proj", "v_proj"]}), None),
    "OFT008": (lambda tmp: edited(tmp, "llama-oft", edit=edit_tensor(f"{Q0}.oft_R.weight", lambda v: v / 0)), None),
    "OFT009": (lambda tmp: edited(tmp, "llama-oft", edit=edit_tensor(f"{Q0}.oft_R.weight", torch.zeros_like)), None),
    "OFT010": (lambda tmp: edited(tmp, "llama-oft"), "gpt2"),
    "OFT011": (lambda tmp: edited(tmp, "llama-oft-shared", edit=edit_tensor(
        f"{Q0}.oft_R.weight", lambda v: torch.zeros(1, 300) + 0.1)), "llama"),
    "OFT012": (lambda tmp: edited(tmp, "llama-oft", edit=_legacy), None),
}


test_each_defect_is_caught_by_exactly_its_rule = rule_corpus_test(CORPUS)


def test_shared_blocks_are_checked_against_the_base(tmp_path):
    """With block_share only the base tells the layer's width: r = 2 is wrong for blocks of in/4."""
    assert check(edited(tmp_path, "llama-oft-shared", {"r": 2})).findings == []
    report = check(edited(tmp_path / "b", "llama-oft-shared", {"r": 2}), base=str(base_path("llama")))
    assert {f.rule for f in report.findings} == {"OFT006"}


BAD_INPUTS = {
    "eps is text": (lambda tmp: edited(tmp, "llama-oft", {"eps": "small"}), "eps is 'small'"),
    "both r and block size": (lambda tmp: edited(tmp, "llama-oft", {"r": 4}), "r is 4 and oft_block_size is 8"),
    "not a triangle": (CORPUS["OFT004"][0], "oft_R is [8, 27]"),
    "old checkpoint": (CORPUS["OFT012"][0], "peft <= 0.15"),
}

test_bad_input_is_one_clear_line = one_clear_line_test(BAD_INPUTS)


def test_load_base_is_untouched_by_apply():
    model = load_base(base_path("llama"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = adaptools.load(adapter_path("llama-oft-coft"))
    with adaptools.plugin.get_method("oft").apply(adapter, model):
        pass
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
