"""Prefix tuning (PEFT PREFIX_TUNING): read, write, check; merge refuses with the reason."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import base_path
from peft_oracle import load_base, logits, peft_model
from safetensors.torch import load_file

import adaptools
from adaptools.operations.check import check


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "projection"])
def prefix_adapter(request, tmp_path_factory):
    from peft import PrefixTuningConfig, get_peft_model

    torch.manual_seed(0)
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, prefix_projection=request.param,
                                encoder_hidden_size=32)
    model = get_peft_model(load_base(base_path("llama")), config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("prefix") / "adapter"
    model.save_pretrained(out)
    return out


def test_round_trip_is_lossless_and_peft_loads_it(prefix_adapter, tmp_path):
    adapter = adaptools.load(prefix_adapter)
    assert adapter.method == "prefix_tuning"
    assert adapter.tensor_names() == ["prompt_embeddings"]
    assert adapter.info("prompt_embeddings").shape == (5, 2 * 2 * 32)  # T, L·2·token_dim (GQA: 2 kv heads × 16)
    adaptools.save(adapter, tmp_path / "p.safetensors")
    adaptools.save(adaptools.load(tmp_path / "p.safetensors"), tmp_path / "peft", format="peft")
    a = load_file(str(prefix_adapter / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b) == ["prompt_embeddings"] and torch.equal(a["prompt_embeddings"],
                                                                           b["prompt_embeddings"])
    assert json.loads((prefix_adapter / "adapter_config.json").read_text()) == json.loads(
        (tmp_path / "peft" / "adapter_config.json").read_text())
    torch.testing.assert_close(logits(peft_model(base_path("llama"), tmp_path / "peft")),
                               logits(peft_model(base_path("llama"), prefix_adapter)), rtol=0, atol=0)


def test_merge_refuses_naming_why(prefix_adapter, tmp_path, cli_runner):
    result = cli_runner("merge", base_path("llama"), prefix_adapter, tmp_path / "out")
    assert result.exit_code == 2
    assert "cannot merge" in result.stderr and "virtual tokens" in result.stderr
    assert not (tmp_path / "out").exists()


def test_info_and_check(prefix_adapter, cli_runner, tmp_path):
    result = cli_runner("info", prefix_adapter)
    assert result.exit_code == 0 and "method: prefix_tuning" in result.stdout
    assert "num_virtual_tokens: 5" in result.stdout
    assert check(prefix_adapter).findings == []
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(prefix_adapter, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    config["num_layers"] = 3
    (bad / "adapter_config.json").write_text(json.dumps(config))
    assert {f.rule for f in check(bad).findings} == {"PREFIX001"}
    assert cli_runner("info", bad).exit_code == 2
