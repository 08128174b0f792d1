"""`adaptools check`: a corpus of broken adapters, each caught by exactly its rule; clean fixtures are clean."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET

import pytest
import torch
from conftest import ADAPTERS, adapter_path, base_path
from safetensors.torch import load_file

import adaptools
from adaptools.operations.check import check

A0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def copy(tmp, name="llama-lora"):
    out = tmp / "adapter"
    shutil.copytree(adapter_path(name), out)
    return out


def with_config(name="llama-lora", **changes):
    def make(tmp):
        out = copy(tmp, name)
        config = json.loads((out / "adapter_config.json").read_text())
        config.update(changes)
        (out / "adapter_config.json").write_text(json.dumps(config))
        return out
    return make


def with_tensors(fn, name="llama-lora"):
    def make(tmp):
        out = copy(tmp, name)
        tensors = {k: v.clone() for k, v in load_file(str(out / "adapter_model.safetensors")).items()}
        (out / "adapter_model.safetensors").unlink()
        fn(tensors)
        adaptools.plugin.save_tensors(out / "adapter_model.safetensors", tensors, {"format": "pt"})
        return out
    return make


def unknown_role(tmp):
    adapter = adaptools.load(adapter_path("llama-lora"))
    tensors = {n: adapter.tensor(n) for n in adapter.tensor_names()}
    tensors["model.layers.0.self_attn.q_proj.lora_C"] = torch.ones(4)
    out = tmp / "odd.safetensors"
    adaptools.save(adaptools.Adapter("lora", adapter.config, adaptools.plugin.MemoryStore(tensors)), out)
    return out


def set_(key, fn):
    def apply(t):
        t[key] = fn(t[key])
    return apply


def pickle_too(tmp):
    out = copy(tmp)
    shutil.copy(adapter_path("llama-bin") / "adapter_model.bin", out / "adapter_model.bin")
    return out


def shape_mismatch(t):
    t[A0] = torch.randn(4, 48) * 0.1


CORPUS = {
    "LORA001": (with_config(use_rslora="yes"), None),
    "LORA002": (unknown_role, None),
    "LORA003": (with_tensors(set_(A0, lambda v: (v * 100).to(torch.int32))), None),
    "LORA004": (with_tensors(lambda t: t.pop(B0)), None),
    "LORA005": (with_tensors(set_(B0, lambda v: v[:, :2].contiguous())), None),
    "LORA006": (with_config(r=8), None),
    "LORA007": (with_config(target_modules=["q_proj"]), None),
    "LORA008": (with_config(use_dora=True), None),
    "LORA009": (with_config("qwen2-lora-bias", lora_bias=False), None),
    "LORA010": (with_config("llama-trainable-tokens", trainable_token_indices=[1, 5]), None),
    "LORA011": (with_tensors(set_(A0, lambda v: v.index_fill(0, torch.tensor([0]), float("nan")))), None),
    "LORA012": (with_tensors(set_(B0, torch.zeros_like)), None),
    "LORA013": (with_config(lora_alpha=1000), None),
    "LORA014": (with_config(init_lora_weights="pissa"), None),
    "LORA015": (with_tensors(lambda t: t.update({"base_model.model.model.norm.weight": torch.ones(64)})), None),
    "LORA016": (with_config("gpt2-lora"), "llama"),
    "LORA017": (with_tensors(shape_mismatch), "llama"),
    "LORA018": (with_config("llama-embedding"), "llama"),
    "LORA019": (with_tensors(set_("base_model.model.model.norm.weight", lambda v: torch.ones(72)),
                             "llama-modules-to-save"), "llama"),
    "AT001": (pickle_too, None),
    "AT002": (with_config(base_model_name_or_path=None), None),
    "AT003": (with_config(base_model_name_or_path="someorg/some-model"), None),
    "AT004": (lambda tmp: adapter_path("llama-bin"), None),
}


@pytest.mark.parametrize("rule", sorted(CORPUS))
def test_each_defect_is_caught_by_exactly_its_rule(rule, tmp_path):
    make, base = CORPUS[rule]
    report = check(make(tmp_path), base=str(base_path(base)) if base else None)
    assert {f.rule for f in report.findings} == {rule}, [(f.rule, f.message) for f in report.findings]
    finding = report.findings[0]
    assert finding.fix and finding.message and finding.path
    assert finding.severity == report.rules[rule][0]


def test_corpus_is_big_enough():
    assert len(CORPUS) >= 20


@pytest.mark.parametrize("name", sorted(p.name for p in ADAPTERS.iterdir() if p.name != "llama-bin"))
def test_clean_fixtures_have_no_findings(name):
    assert check(adapter_path(name)).findings == []
    if name not in ("llama-embedding", "llama-resized-vocab"):  # those two are flagged against their base on purpose
        assert check(adapter_path(name), base=str(base_path(name.split("-")[0]))).findings == []


def test_exit_codes_and_fail_on(tmp_path, cli_runner):
    assert cli_runner("check", adapter_path("llama-lora")).exit_code == 0
    zero = with_tensors(set_(B0, torch.zeros_like))(tmp_path)
    assert cli_runner("check", zero).exit_code == 0  # a warning, below the default --fail-on error
    result = cli_runner("check", zero, "--fail-on", "warning")
    assert result.exit_code == 1
    assert "LORA012 warning: lora_B is all zero" in result.stdout and "fix:" in result.stdout
    assert cli_runner("check", tmp_path / "missing").exit_code == 2
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "adapter_config.json").write_text("{nope")
    assert cli_runner("check", garbage).exit_code == 2
    assert cli_runner("check", adapter_path("llama-lora") / "adapter_config.json").exit_code == 0  # pre-commit


def test_sarif_output(tmp_path, cli_runner):
    bad = with_config(r=8)(tmp_path)
    result = cli_runner("check", bad, "--format", "sarif")
    assert result.exit_code == 1
    sarif = json.loads(result.stdout)
    validate_sarif(sarif)
    run = sarif["runs"][0]
    assert {r["ruleId"] for r in run["results"]} == {"LORA006"}
    assert any(rule["id"] == "LORA006" for rule in run["tool"]["driver"]["rules"])


def validate_sarif(sarif):
    """The parts of the SARIF 2.1.0 schema that code-scanning consumers require (the full schema is not
    available offline here)."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = {
        "type": "object", "required": ["version", "runs"],
        "properties": {
            "version": {"const": "2.1.0"},
            "runs": {"type": "array", "items": {
                "type": "object", "required": ["tool", "results"],
                "properties": {
                    "tool": {"type": "object", "required": ["driver"], "properties": {"driver": {
                        "type": "object", "required": ["name", "rules"], "properties": {"rules": {
                            "type": "array", "items": {"type": "object", "required": ["id"]}}}}}},
                    "results": {"type": "array", "items": {
                        "type": "object", "required": ["ruleId", "message", "level", "locations"],
                        "properties": {"level": {"enum": ["none", "note", "warning", "error"]},
                                       "message": {"type": "object", "required": ["text"]}}}}}}},
        },
    }
    jsonschema.validate(sarif, schema)


def test_junit_output_parses(tmp_path, cli_runner):
    bad = with_config(r=8)(tmp_path)
    result = cli_runner("check", bad, adapter_path("llama-lora"), "--format", "junit")
    assert result.exit_code == 1
    root = ET.fromstring(result.stdout.split("?>", 1)[1])
    suites = root.findall("testsuite")
    assert len(suites) == 2
    assert suites[0].get("failures") == "1" and suites[1].get("failures") == "0"
    failing = [c.get("name") for c in suites[0].findall("testcase") if c.find("failure") is not None]
    assert failing and failing[0].startswith("LORA006")


def test_json_output(cli_runner):
    data = json.loads(cli_runner("check", adapter_path("llama-lora"), "--format", "json").stdout)
    assert data["adapters"][0]["findings"] == []


def test_check_with_perplexity(cli_runner):
    from conftest import FIXTURES

    result = cli_runner("check", adapter_path("llama-lora"), "--base", base_path("llama"), "--check", "perplexity",
                        "--eval-text", FIXTURES / "text" / "GPL-3.txt")
    assert result.exit_code == 0, result.output


def test_a_4bit_base_is_checked_in_its_dense_shapes():
    """A QLoRA adapter against its NF4 base: targets are compared with the weights' real shapes, not the
    packed bytes."""
    assert check(adapter_path("llama-lora"), base=str(base_path("llama-nf4"))).findings == []
