"""Bottleneck adapters from the AdapterHub `adapters` library: read, round-trip, apply, merge, check.

The fixtures and their reference logits were made by the library itself (fixtures/adapterhub.py, run in a
separate venv because `adapters` 1.3.0 pins transformers 4.57); the slow test at the end re-runs that
script and has the library load what adaptools writes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, assert_regenerated, base_path
from safetensors.torch import load_file, save_file

import adaptools
from adaptools.operations.algebra import diff
from adaptools.operations.check import check

HUB = FIXTURES / "adapterhub"
NAMES = sorted(p.name for p in HUB.iterdir() if p.is_dir())
LINEAR = ["gpt2-houlsby-linear", "llama-houlsby-linear"]
REFERENCE = load_file(str(HUB / "reference.safetensors"))


def base_of(name: str) -> str:
    return name.split("-")[0]


def load(name_or_path, **kw) -> adaptools.Adapter:
    path = HUB / name_or_path if isinstance(name_or_path, str) else name_or_path
    return adaptools.load(path, allow_pickle=True, **kw)


def model_logits(model_dir, name: str, adapter=None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        if adapter is None:
            return model(input_ids=REFERENCE[f"input_ids.{base_of(name)}"]).logits
        with adaptools.plugin.get_method(adapter.method).apply(adapter, model):
            return model(input_ids=REFERENCE[f"input_ids.{base_of(name)}"]).logits


def test_fixtures_cover_the_published_architectures():
    assert {"llama-seq-bn", "llama-double-seq-bn", "llama-par-bn"} <= set(NAMES)
    assert (HUB / "llama-seq-bn-extras" / "pytorch_adapter.bin").is_file()  # ln_before: the library pickles


@pytest.mark.parametrize("name", NAMES)
def test_runtime_application_equals_the_adapters_library(name):
    adapter = load(name)
    assert adapter.method == "bottleneck" and adapter.read_format == "adapterhub"
    got = model_logits(base_path(base_of(name)), name, adapter)
    plain = model_logits(base_path(base_of(name)), name)
    torch.testing.assert_close(got, REFERENCE[name], rtol=0, atol=1e-5)
    assert (plain - REFERENCE[name]).abs().max() > 1e-2  # the adapter matters, so the comparison can fail


def test_hooks_are_removed_after_application():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path("llama"), dtype=torch.float32).eval()
    ids = REFERENCE["input_ids.llama"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with adaptools.plugin.get_method("bottleneck").apply(load("llama-double-seq-bn"), model):
            pass
        assert torch.equal(model(input_ids=ids).logits, before)


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_through_the_schema_is_lossless(name, tmp_path):
    adapter = load(name)
    adaptools.save(adapter, tmp_path / "a.safetensors")
    again = adaptools.load(tmp_path / "a.safetensors")
    assert again.method == "bottleneck" and again.config == adapter.config
    adaptools.save(again, tmp_path / "hub", format="adapterhub")
    written = json.loads((tmp_path / "hub" / "adapter_config.json").read_text())
    assert written == json.loads((HUB / name / "adapter_config.json").read_text())
    ours = load_file(str(tmp_path / "hub" / "adapter.safetensors"))
    source = HUB / name / "adapter.safetensors"
    theirs = load_file(str(source)) if source.exists() else torch.load(
        HUB / name / "pytorch_adapter.bin", weights_only=True)
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_pickle_needs_allow_pickle(cli_runner):
    result = cli_runner("info", HUB / "llama-seq-bn-extras")
    assert result.exit_code == 2 and "--allow-pickle" in result.stderr


def test_head_files_are_ignored_and_named():
    adapter = load("llama-seq-bn")
    assert adapter.provenance["ignored_head_files"] == ["head_config.json", "model_head.safetensors"]
    assert all(".output_adapter." in n for n in adapter.tensor_names())


def test_info_names_the_architecture_and_why_merge_is_refused(cli_runner):
    result = cli_runner("info", HUB / "llama-double-seq-bn", "--json")
    info = json.loads(result.stdout)
    assert info["method"] == "bottleneck" and info["summary"]["architecture"].startswith("Houlsby")
    assert "swish" in info["summary"]["merge"]


@pytest.mark.parametrize("name", ["llama-seq-bn", "llama-par-bn", "llama-double-seq-bn"])
def test_merge_refuses_naming_the_non_linearity(name, tmp_path, cli_runner):
    result = cli_runner("merge", base_path("llama"), HUB / name, tmp_path / "out")
    assert result.exit_code == 2, result.stderr
    act = load(name).config["config"]["non_linearity"]
    assert f"non-linearity {act!r}" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", LINEAR)
def test_linear_adapter_folds_exactly_into_the_output_projections(name, tmp_path, cli_runner):
    result = cli_runner("merge", base_path(base_of(name)), HUB / name, tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    torch.testing.assert_close(model_logits(tmp_path / "out", name), REFERENCE[name], rtol=0, atol=2e-6)


def test_linear_fold_with_biases_needs_a_bias_to_hold_them(tmp_path, cli_runner):
    # gpt2-houlsby-linear has non-zero biases; on Llama, o_proj and down_proj have no bias to absorb them.
    adapter = load("llama-houlsby-linear")
    tensors = {n: adapter.tensor(n).clone() for n in adapter.tensor_names()}
    tensors["model.layers.0.output_adapter.up_bias"] += 0.5
    changed = adaptools.Adapter("bottleneck", adapter.config, adaptools.plugin.MemoryStore(tensors), adapter.base)
    adaptools.save(changed, tmp_path / "biased.safetensors")
    result = cli_runner("merge", base_path("llama"), tmp_path / "biased.safetensors", tmp_path / "out")
    assert result.exit_code == 2 and "has no bias" in result.stderr
    assert "model.layers.0.output_adapter.up_bias" in result.stderr


def test_diff_compares_tensors():
    a = load("llama-seq-bn")
    same = diff(a, a)
    assert same.modules and all(m.difference == 0 for m in same.modules) and not same.config
    other = diff(a, load("llama-par-bn"))
    assert other.config["config.is_parallel"] == (False, True)
    assert other.shapes["model.layers.0.output_adapter.down"] == ([4, 64], [32, 64])


def test_diff_cli(cli_runner):
    result = cli_runner("diff", HUB / "llama-seq-bn", HUB / "llama-seq-bn", "--json")
    assert result.exit_code == 0
    assert {m["difference"] for m in json.loads(result.stdout)["modules"]} == {0.0}


@pytest.mark.parametrize("name", NAMES)
def test_clean_fixtures_check_clean_against_their_base(name):
    report = check(str(HUB / name), base=str(base_path(base_of(name))), allow_pickle=True)
    assert [f.rule for f in report.findings] == [], report.findings


def _broken(tmp_path: Path, edit) -> Path:
    adapter = load("llama-double-seq-bn")
    tensors = {n: adapter.tensor(n).clone() for n in adapter.tensor_names()}
    config = json.loads(json.dumps(adapter.config))
    edit(tensors, config)
    out = tmp_path / "broken"
    adaptools.save(adaptools.Adapter("bottleneck", config, adaptools.plugin.MemoryStore(tensors), adapter.base), out,
                   format="adapterhub")
    return out


BROKEN = {
    "BN001": lambda t, c: c["config"].__setitem__("reduction_factor", 8),
    "BN002": lambda t, c: t.__setitem__("model.layers.0.mystery_adapter.down", torch.zeros(4, 64)),
    "BN003": lambda t, c: t.pop("model.layers.1.output_adapter.up"),
    "BN004": lambda t, c: t["model.layers.0.mh_adapter.up"].__setitem__((0, 0), float("nan")),
    "BN005": lambda t, c: c["config"].__setitem__("leave_out", [1]),
    "BN006": lambda t, c: c["config"].__setitem__("non_linearity", "wobble"),
    "BN008": lambda t, c: c["config"].__setitem__("phm_layer", True),
}


@pytest.mark.parametrize("rule", sorted(BROKEN))
def test_each_rule_catches_its_defect(rule, tmp_path):
    if rule == "BN002":  # an unknown location cannot be written in AdapterHub's layout: use the schema file
        adapter = load("llama-double-seq-bn")
        tensors = {n: adapter.tensor(n) for n in adapter.tensor_names()}
        BROKEN[rule](tensors, adapter.config)
        path = tmp_path / "broken.safetensors"
        adaptools.save(adaptools.Adapter("bottleneck", adapter.config, adaptools.plugin.MemoryStore(tensors)), path)
    else:
        path = _broken(tmp_path, BROKEN[rule])
    report = check(str(path))
    assert rule in {f.rule for f in report.findings}, report.findings


def test_base_mismatch_is_caught(tmp_path):
    report = check(str(HUB / "llama-double-seq-bn"), base=str(base_path("qwen2")))
    assert [f.rule for f in report.findings] == ["BN009"], report.findings
    shutil.copytree(base_path("llama"), tmp_path / "base")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    (tmp_path / "base" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1,
                                                               "hidden_size": 32}))
    findings = check(str(HUB / "llama-double-seq-bn"), base=str(tmp_path / "base")).findings
    assert {f.rule for f in findings} == {"BN007"} and len(findings) == 3  # hidden size, and layer 1 twice


def test_other_adapterhub_architectures_are_refused(tmp_path, cli_runner):
    shutil.copytree(HUB / "llama-seq-bn", tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    config["config"] = {"architecture": "lora", "r": 8}
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps(config))
    result = cli_runner("info", tmp_path / "lora")
    assert result.exit_code == 2 and "'lora'" in result.stderr and "Traceback" not in result.stderr


def test_unknown_tensor_is_refused_naming_it(tmp_path, cli_runner):
    shutil.copytree(HUB / "llama-seq-bn", tmp_path / "a")
    tensors = load_file(str(tmp_path / "a" / "adapter.safetensors"))
    tensors["model.invertible_adapters.llama-seq-bn.F.0.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(tmp_path / "a" / "adapter.safetensors"))
    result = cli_runner("info", tmp_path / "a")
    assert result.exit_code == 2 and "invertible_adapters" in result.stderr


def test_perplexity_evaluation_applies_the_adapter():
    from adaptools_plugins.validators.loading import tokenize
    from adaptools_plugins.validators.perplexity import evaluate

    ids = tokenize(base_path("llama"), (FIXTURES / "text" / "GPL-3.txt").read_text()[:3000], 512)
    base = evaluate(base_path("llama"), ids, [], 128)[0]
    adapted = evaluate(base_path("llama"), ids, [load("llama-double-seq-bn")], 128)[0]
    assert abs(adapted - base) / base > 1e-3


AH_VENV = FIXTURES / "cache" / "adapters-venv"


def _adapters_venv() -> Path:
    python = AH_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(AH_VENV)], check=True)
        pip = [str(AH_VENV / "bin" / "pip"), "install", "-q"]
        subprocess.run(pip + ["torch==2.13.0"], check=True)
        subprocess.run(pip + ["adapters==1.3.0", "safetensors"], check=True)
    return python


@pytest.mark.slow
def test_fixtures_are_what_the_library_writes_and_it_loads_ours(tmp_path):
    """Re-run the generator with the real `adapters` library; then load adaptools' writes with it."""
    python = _adapters_venv()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([str(python), str(FIXTURES / "adapterhub.py"), str(tmp_path / "fresh")], check=True, env=env,
                   capture_output=True)
    for path in sorted((tmp_path / "fresh").rglob("*")):
        if path.is_file():
            assert_regenerated(HUB / path.relative_to(tmp_path / "fresh"), path)
    pairs = []
    (tmp_path / "ours").mkdir()
    for name in NAMES:
        adaptools.save(load(name), tmp_path / "ours" / name, format="adapterhub")
        pairs.append(f"{name}={tmp_path / 'ours' / name}")
    fresh_reference = tmp_path / "fresh" / "reference.safetensors"  # this machine's logits, bit for bit
    done = subprocess.run([str(python), str(FIXTURES / "adapterhub.py"), "--load", "--reference", str(fresh_reference),
                           *pairs], check=True, env=env, capture_output=True, text=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(report) == set(NAMES) and max(report.values()) == 0.0, report


def test_merge_check_perplexity_compares_with_the_adapter_applied(tmp_path, cli_runner):
    text = FIXTURES / "text" / "GPL-3.txt"
    result = cli_runner("merge", base_path("llama"), HUB / "llama-houlsby-linear", tmp_path / "out", "--check",
                        "perplexity", "--eval-text", text, "--json")
    assert result.exit_code == 0, result.stderr
    (verdict,) = json.loads((tmp_path / "out" / "adaptools_checks.json").read_text())
    figures = verdict["figures"]
    assert verdict["name"] == "perplexity" and verdict["passed"]
    assert figures["unmerged"] != figures["base"] and abs(figures["merged"] - figures["unmerged"]) < 1e-3


@pytest.mark.parametrize("order", ["lora-first", "bottleneck-first"])
def test_fold_lands_after_other_adapters_whatever_their_order(order, tmp_path, cli_runner):
    """The bottleneck maps o_proj's *output*, LoRA included, so the fold must act last in either order."""
    from conftest import adapter_path
    from transformers import AutoModelForCausalLM

    lora, bottleneck = adapter_path("llama-lora"), HUB / "llama-houlsby-linear"
    pair = [lora, bottleneck] if order == "lora-first" else [bottleneck, lora]
    assert cli_runner("merge", base_path("llama"), *pair, tmp_path / "out").exit_code == 0
    model = AutoModelForCausalLM.from_pretrained(base_path("llama"), dtype=torch.float32).eval()
    ids = REFERENCE["input_ids.llama"]
    with torch.no_grad():
        with adaptools.plugin.get_method("lora").apply(adaptools.load(lora), model), \
                adaptools.plugin.get_method("bottleneck").apply(load("llama-houlsby-linear"), model):
            want = model(input_ids=ids).logits
    torch.testing.assert_close(model_logits(tmp_path / "out", "llama"), want, rtol=0, atol=2e-5)


def test_unknown_parameter_is_refused_naming_it(tmp_path, cli_runner):
    shutil.copytree(HUB / "llama-seq-bn", tmp_path / "a")
    tensors = load_file(str(tmp_path / "a" / "adapter.safetensors"))
    tensors["model.layers.0.output_adapters.adapters.llama-seq-bn.adapter_down.0.W_left"] = torch.zeros(2, 2)
    save_file(tensors, str(tmp_path / "a" / "adapter.safetensors"))
    result = cli_runner("info", tmp_path / "a")
    assert result.exit_code == 2 and "unknown parameter 'adapter_down.0.W_left'" in result.stderr
    assert "PHM" in result.stderr and "Traceback" not in result.stderr
