"""Prefix tuning (PEFT PREFIX_TUNING): read, write, check, bake the projection, apply at runtime exactly as
PeftModel's forward does; merge refuses with the reason."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import base_path
from peft_oracle import load_base, logits, peft_model
from safetensors.torch import load_file, save_file

import adaptools
from adaptools.operations.check import check


def make_prefix(out_dir, projection: bool):
    from peft import PrefixTuningConfig, get_peft_model

    torch.manual_seed(0)
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, prefix_projection=projection,
                                encoder_hidden_size=32)
    model = get_peft_model(load_base(base_path("llama")), config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
    out = out_dir / "adapter"
    model.save_pretrained(out)
    if projection:  # a training checkpoint: the prompt encoder itself, as the model's state dict names it
        checkpoint = out_dir / "checkpoint"
        checkpoint.mkdir()
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k.startswith("prompt_encoder.")}
        assert sorted(state) == sorted(f"prompt_encoder.default.{k}" for k in (
            "embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight", "transform.2.bias"))
        save_file(state, str(checkpoint / "adapter_model.safetensors"))
        (checkpoint / "adapter_config.json").write_text((out / "adapter_config.json").read_text())
    return out


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "projection"])
def prefix_adapter(request, tmp_path_factory):
    return make_prefix(tmp_path_factory.mktemp("prefix"), request.param)


@pytest.fixture(scope="module")
def projection_adapter(tmp_path_factory):
    return make_prefix(tmp_path_factory.mktemp("projection"), True)


IDS = torch.tensor([[1, 5, 7, 9, 17, 33, 64, 100, 127, 3, 2, 8], [4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26]])


@torch.no_grad()
def applied_logits(adapter: adaptools.Adapter, **kwargs) -> torch.Tensor:
    model = load_base(base_path("llama"))
    with adaptools.plugin.get_method(adapter.method).apply(adapter, model):
        return model(input_ids=IDS, **kwargs).logits


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


def test_runtime_application_equals_peft(prefix_adapter):
    reference = peft_model(base_path("llama"), prefix_adapter)
    mask = torch.ones_like(IDS)
    mask[1, :3] = 0  # left padding in the second row: the mask must be extended by the virtual tokens
    with torch.no_grad():
        want, want_masked = reference(input_ids=IDS).logits, reference(input_ids=IDS, attention_mask=mask).logits
        plain = load_base(base_path("llama"))(input_ids=IDS).logits
    adapter = adaptools.load(prefix_adapter)
    torch.testing.assert_close(applied_logits(adapter), want, rtol=0, atol=0)
    torch.testing.assert_close(applied_logits(adapter, attention_mask=mask), want_masked, rtol=0, atol=0)
    assert (plain - want).abs().max() > 1e-2  # the prefix matters, so the comparison can fail


def test_bake_projection_gives_what_peft_saves(projection_adapter, tmp_path, cli_runner):
    prefix_adapter = projection_adapter
    checkpoint = prefix_adapter.parent / "checkpoint"
    stored = adaptools.load(checkpoint)
    assert sorted(adaptools.plugin.split_name(n)[1] for n in stored.tensor_names()) == [
        "embedding", "transform_in", "transform_in_bias", "transform_out", "transform_out_bias"]
    assert "PREFIX004" in {f.rule for f in check(checkpoint).findings}
    result = cli_runner("convert", checkpoint, tmp_path / "baked", "--to", "peft", "--bake-projection")
    assert result.exit_code == 0, result.stderr
    baked = load_file(str(tmp_path / "baked" / "adapter_model.safetensors"))
    saved = load_file(str(prefix_adapter / "adapter_model.safetensors"))
    assert list(baked) == ["prompt_embeddings"] and torch.equal(baked["prompt_embeddings"], saved["prompt_embeddings"])
    assert json.loads((tmp_path / "baked" / "adapter_config.json").read_text()) == json.loads(
        (prefix_adapter / "adapter_config.json").read_text())
    # Applying the unbaked checkpoint bakes on the fly and gives PEFT's outputs too.
    with torch.no_grad():
        want = peft_model(base_path("llama"), prefix_adapter)(input_ids=IDS).logits
    torch.testing.assert_close(applied_logits(stored), want, rtol=0, atol=0)
    # Without --bake-projection the encoder is kept as it is (lossless).
    assert cli_runner("convert", checkpoint, tmp_path / "kept", "--to", "peft").exit_code == 0
    assert sorted(load_file(str(tmp_path / "kept" / "adapter_model.safetensors"))) == sorted(
        k.replace(".default.", ".") for k in load_file(str(checkpoint / "adapter_model.safetensors")))


def test_bake_of_a_plain_prefix_changes_nothing(prefix_adapter, tmp_path, cli_runner):
    assert cli_runner("convert", prefix_adapter, tmp_path / "p", "--to", "peft", "--bake-projection").exit_code == 0
    assert torch.equal(load_file(str(tmp_path / "p" / "adapter_model.safetensors"))["prompt_embeddings"],
                       load_file(str(prefix_adapter / "adapter_model.safetensors"))["prompt_embeddings"])


def test_bake_refused_for_methods_without_one(tmp_path, cli_runner):
    from conftest import adapter_path

    result = cli_runner("convert", adapter_path("llama-lora"), tmp_path / "x", "--bake-projection")
    assert result.exit_code == 2 and "nothing to bake" in result.stderr and not (tmp_path / "x").exists()


def test_eval_scores_base_with_prefix(prefix_adapter, cli_runner):
    text = str(base_path("llama").parent.parent / "text" / "GPL-3.txt")
    plain = json.loads(cli_runner("eval", base_path("llama"), "--eval-text", text, "--max-tokens", "600",
                                  "--json").stdout)
    result = cli_runner("eval", base_path("llama"), "--adapter", prefix_adapter, "--eval-text", text,
                        "--max-tokens", "600", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["perplexity"] != plain["perplexity"]


def test_base_mismatch_and_diff(prefix_adapter):
    findings = check(prefix_adapter, base=str(base_path("gpt2"))).findings
    assert {f.rule for f in findings} == {"PREFIX005"}  # GPT-2 has 4 kv heads of 16: token_dim 64, not 32
    from adaptools.operations.algebra import diff

    adapter = adaptools.load(prefix_adapter)
    assert [m.difference for m in diff(adapter, adapter).modules] == [0.0]
