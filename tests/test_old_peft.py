"""Adapters saved by old peft versions (fixtures/old_peft.py): merged as the version that trained them
computes, or warned about where the config alone cannot say. Fast tests use the committed files; the
``slow`` ones run the old peft from its cached venv (fixtures/cache/peft-<version>)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, assert_regenerated, base_path
from peft_oracle import load_base
from safetensors.torch import load_file

import adaptools
import adaptools.operations.check
from adaptools import MergeInput, merge
from adaptools.operations.algebra import resize

OLD = FIXTURES / "old-peft"
ENABLE_LORA = OLD / "peft-0.2.0-gpt2-enable-lora"
PATTERNS = OLD / "peft-0.13.2-llama-patterns"


def reference(adapter: Path) -> tuple[torch.Tensor, torch.Tensor]:
    ref = load_file(str(adapter / "reference.safetensors"))
    return ref["input_ids"], ref["logits"]


@torch.no_grad()
def merged_logits(base: Path, adapter: adaptools.Adapter, out: Path, ids: torch.Tensor) -> torch.Tensor:
    merge(base, [MergeInput(adapter)], out, dtype="fp32")
    return load_base(out)(input_ids=ids).logits.float()


def test_enable_lora_adapter_reads_and_merges_to_peft_0_2_0_logits(tmp_path):
    adapter = adaptools.load(ENABLE_LORA, allow_pickle=True)
    assert adapter.config["modules"]["transformer.h.0.attn.c_attn"]["scaling"] == 2.0  # alpha 8 / r 4
    ids, expected = reference(ENABLE_LORA)
    got = merged_logits(base_path("gpt2"), adapter, tmp_path / "out", ids)
    base = load_base(base_path("gpt2"))(input_ids=ids).logits.float()
    assert (expected - base).abs().max() > 1e-2  # the adapter changes the output: the test can fail
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_enable_lora_check_has_no_error_and_bad_shapes_are_named(tmp_path):
    report = adaptools.operations.check.check(ENABLE_LORA, base=str(base_path("gpt2")), allow_pickle=True)
    assert not report.at_or_above("error"), report.findings
    bad = tmp_path / "bad"
    shutil.copytree(ENABLE_LORA, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    config["r"] = 8
    (bad / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(adaptools.AdapterFormatError, match="enable_lora"):
        adaptools.load(bad, allow_pickle=True)


def test_enable_lora_resizes_into_a_plain_lora_with_the_same_delta():
    adapter = adaptools.load(ENABLE_LORA, allow_pickle=True)
    method = adaptools.plugin.get_method("lora")
    out, _ = resize(adapter, rank=16)
    assert "enable_lora" not in out.config
    before = method.low_rank(adapter)["transformer.h.0.attn.c_attn"]
    after = method.low_rank(out)["transformer.h.0.attn.c_attn"]
    torch.testing.assert_close(after.b @ after.a, before.b @ before.a, rtol=1e-6, atol=1e-6)


def test_patterns_matching_through_different_keys_are_reported():
    adapter = adaptools.load(PATTERNS)
    report = adaptools.operations.check.check(PATTERNS)
    findings = [f for f in report.findings if f.rule == "LORA021"]
    assert len(findings) == 1 and findings[0].severity == "warning"
    assert "model.layers.0.self_attn.q_proj" in findings[0].message
    warnings = adaptools.plugin.get_method("lora").merge_warnings(adapter)
    assert len(warnings) == 1 and "peft_version" in warnings[0]


def test_recorded_peft_version_selects_the_old_rule_and_reproduces_its_logits(tmp_path):
    ids, expected = reference(PATTERNS)
    today = merged_logits(base_path("llama"), adaptools.load(PATTERNS), tmp_path / "today", ids)
    assert (today - expected).abs().max() > 1e-3  # today's rule gives layer 0's q_proj alpha 32, 0.13 gave 8
    old = tmp_path / "old"
    shutil.copytree(PATTERNS, old)
    config = json.loads((old / "adapter_config.json").read_text())
    config["peft_version"] = "0.13.2"
    (old / "adapter_config.json").write_text(json.dumps(config))
    adapter = adaptools.load(old)
    assert adapter.config["modules"]["model.layers.0.self_attn.q_proj"]["alpha"] == 8
    assert adaptools.plugin.get_method("lora").merge_warnings(adapter) == []
    got = merged_logits(base_path("llama"), adapter, tmp_path / "out", ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def old_rule(config: dict, module: str) -> tuple[int, float]:
    """peft 0.6-0.13's rule, spelled as it was: one key from rank then alpha patterns, `.*\\.KEY$`."""
    keys = list(config.get("rank_pattern", {})) + list(config.get("alpha_pattern", {}))
    key = next((k for k in keys if re.match(rf".*\.{k}$", module)), module)
    return config["rank_pattern"].get(key, config["r"]), config["alpha_pattern"].get(key, config["lora_alpha"])


def test_resize_to_peft_writes_only_known_fields_and_keys_old_peft_matches(tmp_path):
    adapter = adaptools.load(PATTERNS)
    out, _ = resize(adapter, energy=0.9)
    ranks = {m: info["rank"] for m, info in out.config["modules"].items()}
    assert len(set(ranks.values())) > 1  # patterns are needed
    adaptools.save(out, tmp_path / "peft", format="peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert "lora_bias" not in config and "enable_lora" not in config
    for module, rank in ranks.items():
        assert old_rule(config, module) == (rank, rank), module
        assert all(not k.startswith("^") for k in config["rank_pattern"])


@pytest.mark.slow
def test_old_peft_regenerates_the_fixtures_and_loads_what_resize_writes(tmp_path):
    """Re-run the generator in the old peft venvs (built into fixtures/cache once); then peft 0.13.2 itself
    reads the resized adapter and computes what adaptools' merge of it computes."""
    subprocess.run([sys.executable, str(FIXTURES / "old_peft.py"), "--out", str(tmp_path / "fresh")], check=True,
                   capture_output=True)
    for path in sorted((tmp_path / "fresh").rglob("*.safetensors")):
        if path.name == "reference.safetensors":
            assert_regenerated(OLD / path.relative_to(tmp_path / "fresh"), path)
            continue
        ours, theirs = load_file(str(OLD / path.relative_to(tmp_path / "fresh"))), load_file(str(path))
        assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours), path
    out, _ = resize(adaptools.load(PATTERNS), energy=0.9)
    adaptools.save(out, tmp_path / "peft", format="peft")
    ids, _ = reference(PATTERNS)
    ours = merged_logits(base_path("llama"), out, tmp_path / "merged", ids)
    script = (
        "import torch, transformers, peft\n"
        "from safetensors.torch import save_file\n"
        f"m = transformers.LlamaForCausalLM.from_pretrained({str(base_path('llama'))!r})\n"
        f"m = peft.PeftModel.from_pretrained(m, {str(tmp_path / 'peft')!r}).eval()\n"
        f"ids = torch.tensor({ids.tolist()})\n"
        "with torch.no_grad(): out = m(input_ids=ids).logits.float()\n"
        f"save_file({{'logits': out.contiguous()}}, {str(tmp_path / 'theirs.safetensors')!r})\n")
    subprocess.run([str(FIXTURES / "cache" / "peft-0.13.2" / "bin" / "python"), "-c", script], check=True,
                   capture_output=True)
    theirs = load_file(str(tmp_path / "theirs.safetensors"))["logits"]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_enable_lora_applies_unmerged_like_peft_0_2_0():
    adapter = adaptools.load(ENABLE_LORA, allow_pickle=True)
    ids, expected = reference(ENABLE_LORA)
    model = load_base(base_path("gpt2"))
    with adaptools.plugin.get_method("lora").apply(adapter, model), torch.no_grad():
        got = model(input_ids=ids).logits.float()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
