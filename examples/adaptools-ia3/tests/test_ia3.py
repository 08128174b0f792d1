"""The IA3 plugin: installs through its entry point, reads PEFT IA3 adapters, merges exactly like PEFT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]
BASE = ROOT / "fixtures" / "bases" / "llama"


@pytest.fixture(scope="module")
def ia3_adapter(tmp_path_factory):
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    model = get_peft_model(model, IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                            feedforward_modules=["down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("ia3") / "adapter"
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def registered():
    import adaptools_ia3

    from adaptools.plugins import load_plugins, pm

    load_plugins()
    if pm.get_plugin("ia3") is None and not any(p is adaptools_ia3 for p in pm.get_plugins()):
        pm.register(adaptools_ia3, name="ia3")
    return adaptools_ia3


def test_installed_plugin_is_found_through_its_entry_point():
    env = {k: v for k, v in os.environ.items() if k != "ADAPTOOLS_LOAD_PLUGINS"}
    out = subprocess.run([sys.executable, "-m", "adaptools", "plugins", "--json"], capture_output=True, text=True,
                         env=env, check=True).stdout
    plugins = {p["name"]: p for p in json.loads(out)["plugins"]}
    assert plugins["ia3"]["distribution"] == "adaptools-ia3"
    assert plugins["ia3"]["methods"] == ["ia3"]


def test_merge_is_exact_against_peft(ia3_adapter, registered, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import adaptools
    from adaptools import MergeInput, merge

    adapter = adaptools.load(ia3_adapter)
    assert adapter.method == "ia3"
    merge(BASE, [MergeInput(adapter)], tmp_path / "merged")
    ours = {}
    for f in (tmp_path / "merged").glob("*.safetensors"):
        ours.update(load_file(str(f)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
        theirs = PeftModel.from_pretrained(base, ia3_adapter).merge_and_unload().state_dict()
    original = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32).state_dict()
    changed = 0
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key
        changed += not torch.equal(value, original[key])
    assert changed == 6  # k, v and down_proj in two layers


def test_info_and_round_trip(ia3_adapter, registered, tmp_path):
    import adaptools

    adapter = adaptools.load(ia3_adapter)
    adaptools.save(adapter, tmp_path / "ia3.safetensors")
    back = adaptools.load(tmp_path / "ia3.safetensors")
    adaptools.save(back, tmp_path / "peft", format="peft")
    from safetensors.torch import load_file

    a = load_file(str(ia3_adapter / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
