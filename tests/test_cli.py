"""`info` and `convert` on every fixture, as a user runs them."""

from __future__ import annotations

import json

import pytest
from conftest import ADAPTERS, adapter_path, peft_type

import adaptools

ALL = sorted(p.name for p in ADAPTERS.iterdir())
#: The method each fixture reads as, by its PEFT type.


def pickle_flag(name):
    return ["--allow-pickle"] if name == "llama-bin" else []


@pytest.mark.parametrize("name", ALL)
def test_info_on_every_fixture(name, cli_runner):
    method = peft_type(name).lower()
    result = cli_runner("info", adapter_path(name), *pickle_flag(name))
    assert result.exit_code == 0, result.output
    assert f"method: {method}" in result.stdout
    data = json.loads(cli_runner("info", adapter_path(name), "--json", *pickle_flag(name)).stdout)
    assert data["method"] == method
    assert data["format"] == "peft"
    assert data["base"]["name"] == f"fixtures/bases/{name.split('-')[0]}"
    assert data["parameters"] == sum(
        int(__import__("math").prod(t["shape"])) for t in data["tensors"])


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("to", ["schema", "peft"])
def test_convert_on_every_fixture(name, to, tmp_path, cli_runner):
    out = tmp_path / ("out.safetensors" if to == "schema" else "out")
    result = cli_runner("convert", adapter_path(name), out, "--to", to, "--json", *pickle_flag(name))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["output"] == str(out)
    assert adaptools.load(out).read_format == to
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary leftovers


def test_info_tensors_lists_canonical_names(cli_runner):
    result = cli_runner("info", adapter_path("llama-trainable-tokens"), "--tensors")
    assert "model.embed_tokens.trainable_tokens  F32  [3, 64]" in result.stdout
    assert "trainable_token_indices: [1, 5, 7]" in result.stdout


def test_info_mentions_named_adapters(cli_runner):
    assert "named adapters other" in cli_runner("info", adapter_path("qwen2-multi")).stdout


def test_existing_output_needs_force(tmp_path, cli_runner):
    out = tmp_path / "a.safetensors"
    out.write_text("precious")
    result = cli_runner("convert", adapter_path("llama-lora"), out)
    assert result.exit_code == 2
    assert "already exists" in result.stderr and "--force" in result.stderr
    assert out.read_text() == "precious"
    result = cli_runner("convert", adapter_path("llama-lora"), out, "--force")  # not ours: never replaced
    assert result.exit_code == 2 and "not written by adaptools" in result.stderr
    assert out.read_text() == "precious"
    ours = tmp_path / "b.safetensors"
    assert cli_runner("convert", adapter_path("llama-lora"), ours).exit_code == 0
    assert cli_runner("convert", adapter_path("gpt2-lora"), ours, "--force").exit_code == 0
    assert adaptools.load(ours).method == "lora" and "c_attn" in str(adaptools.load(ours).tensor_names())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]


def test_unknown_output_format_is_usage_error(tmp_path, cli_runner):
    result = cli_runner("convert", adapter_path("llama-lora"), tmp_path / "x", "--to", "onnx")
    assert result.exit_code == 2
    assert "unknown format 'onnx'" in result.stderr
    assert not (tmp_path / "x").exists()


def test_hub_reference_offline_not_cached_is_clear(cli_runner, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    result = cli_runner("info", "someorg/some-adapter@v1")
    assert result.exit_code == 2
    assert "not in the hub cache" in result.stderr


def test_hub_reference_resolves_from_cache(monkeypatch, tmp_path):
    """A cached snapshot is found offline, as huggingface-hub lays it out."""
    import shutil

    cache = tmp_path / "cache"
    repo = cache / "models--someorg--some-adapter"
    snapshot = repo / "snapshots" / ("a" * 40)
    shutil.copytree(adapter_path("llama-lora"), snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    adapter = adaptools.load("someorg/some-adapter")
    assert len(adapter.tensor_names()) == 28


def test_help_teaches(cli_runner):
    for command in ("info", "convert", "plugins"):
        result = cli_runner(command, "--help")
        assert result.exit_code == 0
    assert "Example" in cli_runner("info", "--help").stdout
    assert "--force" in cli_runner("convert", "--help").stdout


def test_python_dash_m_runs(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "adaptools", "info", str(adapter_path("llama-lora"))],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "method: lora" in result.stdout
