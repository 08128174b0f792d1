"""PEFT -> schema -> PEFT is lossless, and peft itself loads what we write."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ADAPTERS, SAFE_ADAPTERS, adapter_path, base_path
from peft_oracle import logits, peft_model
from safetensors.torch import load_file

import adaptools

RESIZED = {"llama-resized-vocab": 136}


def peft_tensors(path):
    return load_file(str(path / "adapter_model.safetensors"))


def peft_config(path):
    return json.loads((path / "adapter_config.json").read_text())


@pytest.mark.parametrize("name", sorted(SAFE_ADAPTERS))
def test_peft_schema_peft_is_lossless(name, tmp_path):
    src = adapter_path(name)
    schema_file = tmp_path / f"{name}.safetensors"
    adaptools.save(adaptools.load(src), schema_file, format="schema")
    back = adaptools.load(schema_file)
    assert back.read_format == "schema"
    adaptools.save(back, tmp_path / "peft", format="peft")

    original, rewritten = peft_tensors(src), peft_tensors(tmp_path / "peft")
    assert sorted(original) == sorted(rewritten)
    for key in original:
        assert original[key].dtype == rewritten[key].dtype, key
        assert torch.equal(original[key], rewritten[key]), key
    assert peft_config(src) == peft_config(tmp_path / "peft")


def test_schema_file_carries_version_method_config_base(tmp_path):
    out = tmp_path / "a.safetensors"
    adaptools.save(adaptools.load(adapter_path("llama-rslora-patterns")), out)
    meta = adaptools.plugin.read_header(out).metadata
    assert meta["adaptools.schema"] == "1"
    assert meta["adaptools.method"] == "lora"
    config = json.loads(meta["adaptools.config"])
    assert config["modules"]["model.layers.0.self_attn.q_proj"]["rank"] == 8
    assert config["modules"]["model.layers.0.mlp.down_proj"]["rank"] == 2
    assert config["modules"]["model.layers.1.self_attn.v_proj"]["alpha"] == 3
    assert config["modules"]["model.layers.1.self_attn.v_proj"]["scaling"] == pytest.approx(3 / 2)
    assert json.loads(meta["adaptools.base"])["name"] == "fixtures/bases/llama"
    names = adaptools.plugin.SafetensorsFile(out).keys()
    assert "model.layers.0.self_attn.q_proj.lora_A" in names


def test_schema_metadata_validates_against_json_schema(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    from importlib import resources

    schema = json.loads(resources.files("adaptools").joinpath("schema-v1.json").read_text())
    for name in ("llama-lora", "llama-trainable-tokens", "gpt2-dora"):
        out = tmp_path / f"{name}.safetensors"
        adaptools.save(adaptools.load(adapter_path(name)), out)
        meta = adaptools.plugin.read_header(out).metadata
        jsonschema.validate(meta, schema)
        for key in ("adaptools.config", "adaptools.base", "adaptools.provenance"):
            jsonschema.validate(json.loads(meta[key]), schema["$defs"][key])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"adaptools.schema": "one"}, schema)


@pytest.mark.parametrize("name", sorted(SAFE_ADAPTERS))
def test_peft_loads_rewritten_adapter_with_same_outputs(name, tmp_path):
    src = adapter_path(name)
    adaptools.save(adaptools.load(adaptools.save(adaptools.load(src), tmp_path / "a.safetensors")),
                   tmp_path / "peft", format="peft")
    base = base_path(SAFE_ADAPTERS[name])
    expected = logits(peft_model(base, src, resize=RESIZED.get(name)))
    got = logits(peft_model(base, tmp_path / "peft", resize=RESIZED.get(name)))
    assert torch.equal(expected, got)


def test_named_adapter_in_subfolder_reads_and_is_listed():
    root = adaptools.load(adapter_path("qwen2-multi"))
    assert root.provenance["named_adapters"] == ["other"]
    other = adaptools.load(adapter_path("qwen2-multi") / "other")
    assert other.config["use_dora"] is True
    assert {r for m in other.modules().values() for r in m} == {"lora_A", "lora_B", "lora_magnitude"}


def test_pickle_read_only_when_allowed_and_equal_to_safetensors(tmp_path):
    with pytest.raises(adaptools.UnsafeInputError):
        adaptools.load(adapter_path("llama-bin"))
    pickled = adaptools.load(adapter_path("llama-bin"), allow_pickle=True)
    state = torch.load(ADAPTERS / "llama-bin" / "adapter_model.bin", weights_only=True)
    assert len(state) == len(pickled.tensor_names())
    adaptools.save(pickled, tmp_path / "peft", format="peft")
    rewritten = peft_tensors(tmp_path / "peft")
    assert sorted(rewritten) == sorted(state)
    for key, value in state.items():
        assert torch.equal(value, rewritten[key])


def test_legacy_key_spellings_are_normalised(tmp_path):
    """Keys with a leftover adapter name, no base_model prefix, and magnitude.weight
    (docs/peft.md, "Legacy spellings")."""
    src = adapter_path("llama-dora")
    state = peft_tensors(src)
    legacy = {}
    for key, value in state.items():
        key = key.replace("base_model.model.", "")
        key = key.replace(".lora_A.weight", ".lora_A.default.weight")
        key = key.replace(".lora_magnitude_vector", ".lora_magnitude_vector.weight")
        legacy[key] = value
    out = tmp_path / "legacy"
    out.mkdir()
    (out / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    adaptools.plugin.save_tensors(out / "adapter_model.safetensors", legacy)
    adaptools.save(adaptools.load(out), tmp_path / "peft", format="peft")
    rewritten = peft_tensors(tmp_path / "peft")
    assert sorted(rewritten) == sorted(state)
    assert all(torch.equal(rewritten[k], v) for k, v in state.items())
