"""OLoRA and PiSSA: init as PEFT does, conversion to plain LoRA as PEFT does, and merging on the fly."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import base_path
from peft_oracle import load_base
from safetensors.torch import load_file

import adaptools
from adaptools import MergeInput, merge

TARGETS = ["q_proj", "v_proj", "down_proj"]


def state(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module", params=["olora", "pissa"])
def peft_run(request, tmp_path_factory):
    """PEFT's own workflow: init, save the initial adapter, 'train', save, save converted."""
    from peft import LoraConfig, get_peft_model

    init = request.param
    tmp = tmp_path_factory.mktemp(init)
    torch.manual_seed(0)
    model = get_peft_model(load_base(base_path("llama")), LoraConfig(r=4, lora_alpha=8, init_lora_weights=init,
                                                                     target_modules=TARGETS))
    residual = {k.replace("base_model.model.", "").replace(".base_layer", ""): v.clone()
                for k, v in model.state_dict().items() if "lora_" not in k}
    model.save_pretrained(tmp / "init-as-peft")  # config still says init_lora_weights=olora|pissa
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(tmp / "initial")  # what path_initial_model_for_weight_conversion needs
    model.peft_config["default"].init_lora_weights = init
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # "training"
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(tmp / "trained")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp / "converted", path_initial_model_for_weight_conversion=str(tmp / "initial"))
    return init, tmp, residual


def test_init_matches_peft(peft_run, tmp_path, cli_runner):
    init, tmp, residual = peft_run
    result = cli_runner("init", base_path("llama"), tmp_path / "ours", "--method", init, "--rank", "4", "--alpha",
                        "8", "--targets", ",".join(TARGETS), "--write-base", tmp_path / "residual")
    assert result.exit_code == 0, result.output
    ours = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    theirs = load_file(str(tmp / "init-as-peft" / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["init_lora_weights"] == init
    written = state(tmp_path / "residual")
    assert len(written) == 20  # every stored tensor (lm_head is tied, so not stored)
    for key, value in written.items():
        torch.testing.assert_close(value, residual[key], rtol=0, atol=1e-5)


def test_conversion_matches_peft_and_keeps_rank_2r(peft_run, tmp_path, cli_runner):
    init, tmp, _ = peft_run
    result = cli_runner("convert", tmp / "trained", tmp_path / "plain", "--to", "lora", "--base", base_path("llama"))
    assert result.exit_code == 0, result.output
    ours = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    theirs = load_file(str(tmp / "converted" / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6)
    ours_cfg = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    theirs_cfg = json.loads((tmp / "converted" / "adapter_config.json").read_text())
    assert (ours_cfg["r"], ours_cfg["lora_alpha"], ours_cfg["init_lora_weights"]) == (
        theirs_cfg["r"], theirs_cfg["lora_alpha"], theirs_cfg["init_lora_weights"]) == (8, 16, True)
    # with the initial adapter instead of recomputing it: the same factors
    result = cli_runner("convert", tmp / "trained", tmp_path / "plain2", "--to", "lora", "--initial", tmp / "initial")
    assert result.exit_code == 0, result.output
    again = load_file(str(tmp_path / "plain2" / "adapter_model.safetensors"))
    assert all(torch.equal(again[k], ours[k]) for k in ours)


def test_merge_on_the_fly_equals_merging_the_converted_adapter(peft_run, tmp_path):
    init, tmp, _ = peft_run
    merge(base_path("llama"), [MergeInput(adaptools.load(tmp / "trained"))], tmp_path / "on-the-fly")
    merge(base_path("llama"), [MergeInput(adaptools.load(tmp / "converted"))], tmp_path / "converted")
    a, b = state(tmp_path / "on-the-fly"), state(tmp_path / "converted")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=2e-6)
    # and it is what PEFT's trained model computes: PEFT re-runs the init on the original base at load
    from peft_oracle import logits, peft_model

    torch.testing.assert_close(logits(load_base(tmp_path / "on-the-fly")),
                               logits(peft_model(base_path("llama"), tmp / "trained")), rtol=1e-4, atol=1e-4)


def test_non_reproducible_init_needs_initial(peft_run, tmp_path, cli_runner):
    init, tmp, _ = peft_run
    trained = tmp_path / "niter"
    import shutil

    shutil.copytree(tmp / "trained", trained)
    config = json.loads((trained / "adapter_config.json").read_text())
    config["init_lora_weights"] = "pissa_niter_4"
    (trained / "adapter_config.json").write_text(json.dumps(config))
    result = cli_runner("convert", trained, tmp_path / "x", "--to", "lora", "--base", base_path("llama"))
    assert result.exit_code == 2 and "--initial" in result.stderr
    result = cli_runner("merge", base_path("llama"), trained, tmp_path / "y")
    assert result.exit_code == 2 and "initial" in result.stderr


def test_merge_with_initial_equals_merge_on_the_fly(peft_run, tmp_path, cli_runner):
    init, tmp, _ = peft_run
    assert cli_runner("merge", base_path("llama"), tmp / "trained", tmp_path / "a", "--initial",
                      tmp / "initial").exit_code == 0
    assert cli_runner("merge", base_path("llama"), tmp / "trained", tmp_path / "b").exit_code == 0
    a, b = state(tmp_path / "a"), state(tmp_path / "b")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=2e-6)
