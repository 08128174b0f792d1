"""LoRA on fused mixture-of-experts parameters (PEFT ``target_parameters``): reading, merge against PEFT's own
``merge_and_unload`` bit for bit, runtime application against PEFT's forward, info, check and hostile configs.
The bases and adapters come from transformers' and PEFT's own classes (fixtures/build_moe.py)."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from conftest import FIXTURES
from peft_oracle import load_base, logits, peft_model
from safetensors.torch import load_file, save_file

import adaptools

sys.path.insert(0, str(FIXTURES))
import build_moe  # noqa: E402

IDS = torch.tensor([[1, 5, 7, 9, 17, 33, 60, 3, 2, 8, 11, 40]])  # the tiny vocabulary has 64 tokens
FUSED = [("gptoss", "gptoss-experts"), ("qwen3moe", "qwen3moe-experts"), ("mixtral", "mixtral-experts"),
         ("gptoss", "gptoss-down")]


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return build_moe.build(tmp_path_factory.mktemp("moe"))


def _state(folder):
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize(("base", "name"), FUSED + [("qwen3moe", "qwen3moe-per-expert")])
def test_merge_equals_peft_merge_and_unload(moe, tmp_path, cli_runner, base, name):
    """Every tensor of the merged checkpoint equals PEFT's merged model as transformers saves it, bit for bit:
    fused experts (gpt-oss) and per-expert checkpoints (Qwen3-MoE ``experts.<e>.gate_proj``, Mixtral
    ``block_sparse_moe.experts.<e>.w1``); the per-expert adapter is transformers 4's layout, converted by PEFT."""
    result = cli_runner("merge", moe[base], moe[name], tmp_path / "out")
    assert result.exit_code == 0, result.output
    ours, theirs, original = _state(tmp_path / "out"), _state(moe[f"{name}-peft-merged"]), _state(moe[base])
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    changed = [k for k in theirs if "expert" in k and not torch.equal(theirs[k], original[k])]
    assert len(changed) >= 2, "PEFT's merge changed no expert: the comparison proves nothing"


def test_expert_parameters_read_into_the_schema(moe):
    """The nesting PEFT saves (``experts.base_layer`` = the first wrapped parameter) resolves to the parameter,
    its rank from rank_pattern on the parameter's path, and the expert count from lora_A's rows."""
    adapter = adaptools.load(moe["gptoss-experts"])
    modules = adapter.config["modules"]
    inner, outer = modules["model.layers.0.mlp.experts.base_layer"], modules["model.layers.0.mlp.experts"]
    assert (inner["parameter"], inner["rank"], inner["experts"]) == ("model.layers.0.mlp.experts.gate_up_proj", 2, 4)
    assert (outer["parameter"], outer["rank"], outer["experts"]) == ("model.layers.0.mlp.experts.down_proj", 3, 4)
    assert inner["kind"] == outer["kind"] == "experts" and inner["scaling"] == 2.0
    summary = adaptools.plugin.get_method("lora").summary(adapter)
    assert summary["expert_parameters"]["model.layers.1.mlp.experts.down_proj"] == 4


def test_roundtrip_keeps_peft_keys(moe, tmp_path):
    """Written back as PEFT, the adapter has PEFT's own keys and loads in PEFT to the same forward."""
    adapter = adaptools.load(moe["mixtral-experts"])
    adaptools.save(adapter, tmp_path / "again", format="peft")
    assert sorted(_state_keys(tmp_path / "again")) == sorted(_state_keys(moe["mixtral-experts"]))
    torch.testing.assert_close(logits(peft_model(moe["mixtral"], tmp_path / "again"), IDS),
                               logits(peft_model(moe["mixtral"], moe["mixtral-experts"]), IDS), rtol=0, atol=0)


def test_schema_file_keeps_the_expert_levels(moe, tmp_path, cli_runner):
    """An adaptools schema file carries each level's parameter and expert count, and merges the same bits."""
    adapter = adaptools.load(moe["gptoss-experts"])
    adaptools.save(adapter, tmp_path / "schema.safetensors")
    again = adaptools.load(tmp_path / "schema.safetensors")
    assert again.config["modules"] == adapter.config["modules"]
    result = cli_runner("merge", moe["gptoss"], tmp_path / "schema.safetensors", tmp_path / "out")
    assert result.exit_code == 0, result.output
    theirs, ours = _state(moe["gptoss-experts-peft-merged"]), _state(tmp_path / "out")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def _state_keys(folder):
    return load_file(str(folder / "adapter_model.safetensors")).keys()


@pytest.mark.parametrize(("base", "name"), FUSED)
def test_apply_matches_peft_forward(moe, base, name):
    expected = logits(peft_model(moe[base], moe[name]), IDS)
    model = load_base(moe[base])
    before = logits(model, IDS)
    adapter = adaptools.load(moe[name])
    with adaptools.plugin.get_method("lora").apply(adapter, model):
        got = logits(model, IDS)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, before, atol=1e-4), "the adapter had no effect: the test proves nothing"
    assert torch.equal(logits(model, IDS), before)  # undone on exit


def test_per_expert_adapter_applies_to_fused_experts(moe):
    """A transformers 4 per-expert LoRA on a transformers 5 model (fused experts): each expert's delta goes to
    its rows of the fused parameter, as PEFT's conversion does; PEFT's forward is the oracle."""
    expected = logits(peft_model(moe["qwen3moe"], moe["qwen3moe-per-expert"]), IDS)
    model = load_base(moe["qwen3moe"])
    before = logits(model, IDS)
    with adaptools.plugin.get_method("lora").apply(adaptools.load(moe["qwen3moe-per-expert"]), model):
        got = logits(model, IDS)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, before, atol=1e-4), "the adapter had no effect: the test proves nothing"
    assert torch.equal(logits(model, IDS), before)


def test_info_shows_expert_parameters(moe, cli_runner):
    result = cli_runner("info", moe["qwen3moe-experts"])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("target_parameters:"))
    assert "'mlp.experts.gate_up_proj'" in line and "'mlp.experts.down_proj'" in line  # saved in no fixed order
    assert "'model.layers.0.mlp.experts.gate_up_proj': 4" in result.output
    assert "'experts': 4" in result.output


def test_check_is_clean_on_the_right_base(moe, cli_runner):
    result = cli_runner("check", moe["mixtral-experts"], "--base", moe["mixtral"])
    assert result.exit_code == 0 and "0 finding(s)" in result.output, result.output


def _liar(moe, tmp_path, **fields):
    folder = tmp_path / "liar"
    shutil.copytree(moe["gptoss-down"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(fields)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_expert_count_that_lies_is_refused(moe, tmp_path, cli_runner):
    """r 2 instead of 4: the 16 rows of lora_A read as 8 experts, the base has 4. check names the rule, merge
    refuses in one line with exit 2, nothing written."""
    liar = _liar(moe, tmp_path, r=2)
    result = cli_runner("check", liar, "--base", moe["gptoss"])
    assert result.exit_code != 0 and "LORA024" in result.output and "8 experts" in result.output, result.output
    result = cli_runner("merge", moe["gptoss"], liar, tmp_path / "out")
    assert result.exit_code == 2 and "8 experts" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_rank_that_does_not_divide_is_refused(moe, tmp_path, cli_runner):
    liar = _liar(moe, tmp_path, r=3)
    result = cli_runner("check", liar)
    assert result.exit_code != 0 and "LORA006" in result.output and "whole number of experts" in result.output
    result = cli_runner("merge", moe["gptoss"], liar, tmp_path / "out")
    assert result.exit_code == 2 and "whole number of experts" in result.output, result.output


def test_base_without_the_parameter_is_refused(moe, tmp_path, cli_runner):
    """A dense Llama has no experts: check reports LORA024 per parameter, merge refuses naming it."""
    llama = FIXTURES / "bases" / "llama"
    result = cli_runner("check", moe["gptoss-down"], "--base", llama)
    assert "LORA024" in result.output and "model.layers.0.mlp.experts.down_proj" in result.output, result.output
    result = cli_runner("merge", llama, moe["gptoss-down"], tmp_path / "out", "--ignore-base-mismatch")
    assert result.exit_code == 2 and "has no model.layers.0.mlp.experts.down_proj" in result.output, result.output


def test_shape_that_lies_is_refused(moe, tmp_path, cli_runner):
    """Same expert count, another expert width (gpt-oss with intermediate_size 20): the factors do not fit."""
    wide = tmp_path / "wide"
    import transformers as tf

    config = tf.AutoConfig.from_pretrained(moe["gptoss"])
    config.intermediate_size = 20
    tf.GptOssForCausalLM(config).save_pretrained(wide)
    result = cli_runner("merge", wide, moe["gptoss-down"], tmp_path / "out")
    assert result.exit_code == 2 and "the base's model.layers.0.mlp.experts.down_proj 20 to 24" in result.output, \
        result.output
    result = cli_runner("check", moe["gptoss-down"], "--base", wide)
    assert "LORA024" in result.output, result.output


def test_unknown_nesting_is_reported(moe, tmp_path, cli_runner):
    """Two wrapper levels but one target parameter in the config: which level is which cannot be told."""
    liar = tmp_path / "nesting"
    shutil.copytree(moe["gptoss-experts"], liar)
    config = json.loads((liar / "adapter_config.json").read_text())
    config["target_parameters"] = ["mlp.experts.down_proj"]
    (liar / "adapter_config.json").write_text(json.dumps(config))
    result = cli_runner("check", liar)
    assert "LORA024" in result.output and "cannot tell" in result.output, result.output
    result = cli_runner("merge", moe["gptoss"], liar, tmp_path / "out")
    assert result.exit_code == 2 and "cannot tell" in result.output, result.output


def test_dora_with_target_parameters_is_refused(moe, tmp_path, cli_runner):
    liar = _liar(moe, tmp_path, use_dora=True)
    result = cli_runner("merge", moe["gptoss"], liar, tmp_path / "out")
    assert result.exit_code == 2 and "use_dora" in result.output, result.output


@pytest.mark.parametrize(("base", "name"), [("gptoss", "gptoss-experts"), ("qwen3moe", "qwen3moe-experts")])
def test_bf16_merge_rounds_the_delta_as_peft_does(moe, tmp_path, cli_runner, base, name):
    """PEFT's ParamWrapper casts the delta to bf16 before adding it; the merge does the same and equals
    merge_and_unload on a bf16 base bit for bit (adding the fp32 delta and rounding once differs in ~18% of
    the elements by one unit in the last place, measured on these fixtures)."""
    from peft import PeftModel

    bf16 = tmp_path / "bf16"
    load_base(moe[base], torch.bfloat16).save_pretrained(bf16)
    PeftModel.from_pretrained(load_base(bf16, torch.bfloat16), moe[name]).merge_and_unload().save_pretrained(
        tmp_path / "peft")
    result = cli_runner("merge", bf16, moe[name], tmp_path / "ours")
    assert result.exit_code == 0, result.output
    ours, theirs = _state(tmp_path / "ours"), _state(tmp_path / "peft")
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert ours[key].dtype == torch.bfloat16 and torch.equal(ours[key], theirs[key]), key
    original = _state(bf16)
    assert any("experts" in k and not torch.equal(theirs[k], original[k]) for k in theirs), "nothing merged"


def test_unmerge_gives_a_base_that_merges_back(moe, tmp_path, cli_runner):
    """unmerge runs the merge's own expert updates: its output merges back to the merged model bit for bit
    (docs/unmerge.md's promise), per-expert checkpoint and fused alike."""
    for base, name in (("qwen3moe", "qwen3moe-experts"), ("gptoss", "gptoss-experts")):
        merged, back, again = tmp_path / f"{name}-m", tmp_path / f"{name}-u", tmp_path / f"{name}-m2"
        for args in (("merge", moe[base], moe[name], merged), ("unmerge", merged, moe[name], back),
                     ("merge", back, moe[name], again)):
            result = cli_runner(*args)
            assert result.exit_code == 0, result.output
        first, second, undone = _state(merged), _state(again), _state(back)
        assert all(torch.equal(first[k], second[k]) for k in first)
        assert any(not torch.equal(undone[k], first[k]) for k in first if "experts" in k)


def _without(moe, tmp_path, drop):
    folder = tmp_path / "dropped"
    shutil.copytree(moe["gptoss-experts"], folder)
    state = load_file(str(folder / "adapter_model.safetensors"))
    save_file({k: v for k, v in state.items() if not drop(k)}, str(folder / "adapter_model.safetensors"),
              {"format": "pt"})
    return folder


def test_dropped_expert_factors_are_reported(moe, tmp_path, cli_runner):
    """target_parameters set but no expert factors saved (what unsloth-zoo#647 describes): check and merge
    refuse naming the field; only layer 1's experts missing: check against the base names them (merge then
    does what PEFT does, the missing wrappers keep a zero delta)."""
    folder = _without(moe, tmp_path, lambda k: ".mlp." in k)
    result = cli_runner("check", folder)
    assert "LORA024" in result.output and "holds no expert factors" in result.output, result.output
    result = cli_runner("merge", moe["gptoss"], folder, tmp_path / "out")
    assert result.exit_code == 2 and "holds no expert factors" in result.output, result.output
    shutil.rmtree(folder)
    folder = _without(moe, tmp_path, lambda k: "layers.1.mlp" in k)
    assert "0 finding(s)" in cli_runner("check", folder).output  # nothing says so without the base
    result = cli_runner("check", folder, "--base", moe["gptoss"])
    assert "LORA024" in result.output and "model.layers.1.mlp.experts.down_proj (and 1 more)" in result.output


def test_bare_parameter_name_leaves_module_loras_alone(moe, tmp_path, cli_runner):
    """target_parameters ["down_proj"] (no module part) matches any module's down_proj parameter; q_proj,
    which target_modules selects, stays a plain LoRA module, and the merge still equals PEFT's."""
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(load_base(moe["qwen3moe"]), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                                 target_parameters=["down_proj"]))
    build_moe.seeded(peft, 70)
    peft.save_pretrained(tmp_path / "bare")
    build_moe.peft_merged(moe["qwen3moe"], tmp_path / "bare", tmp_path / "peft")
    kinds = {m: i["kind"] for m, i in adaptools.load(tmp_path / "bare").config["modules"].items()}
    assert kinds["model.layers.0.self_attn.q_proj"] == "linear" and kinds["model.layers.0.mlp.experts"] == "experts"
    result = cli_runner("merge", moe["qwen3moe"], tmp_path / "bare", tmp_path / "out")
    assert result.exit_code == 0, result.output
    ours, theirs = _state(tmp_path / "out"), _state(tmp_path / "peft")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
