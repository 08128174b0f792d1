"""The logits and generate validators on the fixtures: exact merges pass, broken ones fail, and `check` flags
adapters that change nothing or break the outputs. (The NF4 SmolLM2 case is in test_real_model.py.)"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import FIXTURES, adapter_path, base_path

import adaptools
from adaptools import MergeInput
from adaptools.engine import CheckRequest, merge
from adaptools.plugin import ValidationContext

TEXT = FIXTURES / "text" / "GPL-3.txt"


def verdict(name, base, adapters, output, operation="merge", **options):
    context = ValidationContext(operation, str(base), adapters, str(output), options)
    return adaptools.plugin.get_validator(name).validate(context)


@pytest.fixture(scope="module")
def lora():
    return adaptools.load(adapter_path("llama-lora"))


@pytest.mark.parametrize("base, name, options, dtype", [
    ("llama", "llama-lora", {}, "F32"),
    ("llama", "llama-lora", {"dtype": "fp16"}, "F16"),
    ("llama", "llama-lora", {"dtype": "bf16"}, "BF16"),
    ("qwen2", "qwen2-lora-bias", {}, "BF16"),
    ("llama-nf4", "llama-lora", {}, "BF16"),  # dequantize-merge, against the 4-bit base + adapter
])
def test_exact_merges_pass_within_their_dtype_tolerance(base, name, options, dtype, tmp_path):
    adapter = adaptools.load(adapter_path(name))
    summary = merge(base_path(base), [MergeInput(adapter)], tmp_path / "out",
                    checks=(CheckRequest("logits"), CheckRequest("generate")), **options)
    logits, generate = summary.checks
    assert logits["passed"] and generate["passed"], (logits["message"], generate["message"])
    figures = logits["figures"]
    assert figures["tolerance"]["dtype"] == dtype and figures["source"] == "built-in prompts"
    assert figures["tokens"] > 100 and figures["decisive_flips"] == 0
    assert figures["adapter_effect"]["mean_kl"] > 100 * figures["mean_kl"]  # the adapter matters, the merge does not
    if dtype == "F32":
        assert figures["top1_agreement"] == 1.0 and figures["mean_kl"] < 1e-12
    assert len(generate["figures"]["continuations"]) == 3


def test_requantizing_into_4_bit_fails(lora, tmp_path):
    summary = merge(base_path("llama-nf4"), [MergeInput(lora)], tmp_path / "out", requantize=True,
                    checks=(CheckRequest("logits"),))
    check = summary.checks[0]
    assert not check["passed"] and "does not behave like the reference" in check["message"]
    assert check["figures"]["mean_kl"] > check["figures"]["tolerance"]["mean_kl"]


@pytest.mark.parametrize("broken", ["half weight", "dropped layer", "nothing merged"])
@pytest.mark.parametrize("check", ["logits", "generate"])
def test_broken_merges_fail(broken, check, lora, tmp_path):
    if broken == "half weight":
        inputs = [MergeInput(lora, 0.5)]
    elif broken == "dropped layer":  # a layer lost to a name mismatch
        inputs = [MergeInput(adaptools.Adapter("lora", lora.config, adaptools.plugin.MemoryStore(
            {n: lora.tensor(n) for n in lora.tensor_names() if ".layers.0." not in n})))]
    else:
        inputs = []
    merge(base_path("llama"), inputs, tmp_path / "out")
    result = verdict(check, base_path("llama"), [lora], tmp_path / "out")
    assert not result.passed, result.message
    if check == "generate":
        first = next(r for r in result.figures["continuations"] if "diverges_at" in r)
        assert first["reference"] != first["candidate"] and not first["near_tie"]
        assert f"first at token {first['diverges_at']}" in result.message


def test_unmerge_and_swap_compare_the_right_sides(lora, tmp_path):
    """unmerge: MERGED against OUT + adapter; swap: MERGED + added against OUT + removed."""
    merge(base_path("llama"), [MergeInput(lora)], tmp_path / "m")
    regex = adaptools.load(adapter_path("llama-regex"))
    summary = adaptools.unmerge(tmp_path / "m", [MergeInput(lora)], tmp_path / "u", checks=(CheckRequest("logits"),))
    figures = summary.checks[0]["figures"]
    assert summary.checks[0]["passed"] and figures["reference"] == str(tmp_path / "m")
    assert figures["candidate"].endswith("+ 1 adapter(s)")
    summary = adaptools.unmerge(tmp_path / "m", [MergeInput(lora)], tmp_path / "s", added=[MergeInput(regex)],
                                checks=(CheckRequest("logits"), CheckRequest("generate")))
    assert all(c["passed"] for c in summary.checks), summary.checks
    # taking out an adapter that is not in the model gives a model that, with it applied, still is MERGED:
    # the check confirms consistency, and provenance (a warning) says the adapter was never merged
    wrong = verdict("logits", tmp_path / "m", [lora], base_path("llama"), operation="unmerge", removed=[True])
    assert wrong.passed


def zero_b(lora, tmp_path):
    tensors = {n: torch.zeros_like(lora.tensor(n)) if n.endswith("lora_B") else lora.tensor(n)
               for n in lora.tensor_names()}
    path = tmp_path / "zero-b.safetensors"
    adaptools.save(adaptools.Adapter("lora", lora.config, adaptools.plugin.MemoryStore(tensors), lora.base), path)
    return path


def alpha_zero(lora, tmp_path):
    path = tmp_path / "alpha0"
    shutil.copytree(adapter_path("llama-lora"), path)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 0}))
    return path


def matching_nothing(lora, tmp_path):
    """Saved with an extra wrapper in every key: PEFT would load nothing (and warn); the base has no such module."""
    from safetensors.torch import load_file, save_file

    path = tmp_path / "nowhere"
    shutil.copytree(adapter_path("llama-lora"), path)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    save_file({k.replace("model.model.layers", "model.model.decoder.layers"): v for k, v in tensors.items()},
              str(path / "adapter_model.safetensors"))
    return path


def overflowing(lora, tmp_path):
    tensors = {n: lora.tensor(n) * (1e20 if n.endswith("lora_B") else 1) for n in lora.tensor_names()}
    path = tmp_path / "huge.safetensors"
    adaptools.save(adaptools.Adapter("lora", lora.config, adaptools.plugin.MemoryStore(tensors), lora.base), path)
    return path


@pytest.mark.parametrize("make, message", [
    (zero_b, "does not change the base's outputs"),
    (alpha_zero, "does not change the base's outputs"),
    (matching_nothing, "does not apply to this base"),
    (overflowing, "non-finite logits"),
])
def test_check_flags_adapters_that_change_nothing_or_break_the_outputs(make, message, lora, tmp_path, cli_runner):
    result = cli_runner("check", make(lora, tmp_path), "--base", base_path("llama"), "--check", "logits")
    assert result.exit_code == 1, result.output
    assert f"check logits failed: the {message}" in result.stderr or message in result.stderr


def test_check_passes_an_adapter_that_works(cli_runner):
    result = cli_runner("check", adapter_path("llama-lora"), "--base", base_path("llama"), "--check", "logits",
                        "--check", "generate")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # no progress bar off a terminal


def test_the_context_operation_is_check_there(lora, tmp_path, monkeypatch):
    from adaptools.operations.check import run_validators

    seen = []
    logits = adaptools.plugin.get_validator("logits")
    original = type(logits).validate
    monkeypatch.setattr(type(logits), "validate", lambda self, context: seen.append(context.operation) or
                        original(self, context))
    run_validators(str(adapter_path("llama-lora")), str(base_path("llama")), (CheckRequest("logits"),))
    assert seen == ["check"]


def test_token_sources(lora, tmp_path):
    from adaptools_plugins.validators.sequences import token_sequences

    merge(base_path("llama"), [MergeInput(lora)], tmp_path / "m")
    assert token_sequences(str(tmp_path / "m"), None, 4, 64).source == "built-in prompts"
    text = token_sequences(str(tmp_path / "m"), str(TEXT), 3, 50)
    assert text.source == "evaluation text" and [len(s) for s in text.ids] == [50, 50, 50]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "m" / name).unlink()
    random = token_sequences(str(tmp_path / "m"), None, 2, 500)
    assert random.source == "random token ids (seed 0)" and [len(s) for s in random.ids] == [128, 128]  # context
    assert torch.equal(random.ids[0], token_sequences(str(tmp_path / "m"), None, 2, 500).ids[0])
    assert verdict("logits", base_path("llama"), [lora], tmp_path / "m").passed
    assert verdict("generate", base_path("llama"), [lora], tmp_path / "m").passed
    with pytest.raises(adaptools.InputError, match="needs the model's tokenizer"):
        token_sequences(str(tmp_path / "m"), str(TEXT), 2, 10)


def test_merge_check_logits_with_eval_text(tmp_path, cli_runner):
    result = cli_runner("merge", base_path("llama"), adapter_path("llama-lora"), tmp_path / "out", "--check",
                        "logits", "--eval-text", TEXT, "--check-option", "sequences=2", "--json")
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)["checks"][0]["figures"]
    assert figures["source"] == "evaluation text" and figures["sequences"] == 2 and figures["tokens"] == 128


@pytest.mark.parametrize("args, message", [
    (["--check", "logits", "--check-option", "sequences=0"], "at least 1"),
    (["--check", "logits", "--check-option", "max_kl=nan"], "not a finite number"),
    (["--check", "logits", "--check-option", "max_kl=-1"], "at least 0"),
    (["--check", "generate", "--check-option", "new_tokens=x"], "not a int"),
    (["--check", "logits", "--eval-text", "missing.txt"], "evaluation text not found"),
    (["--check", "generate", "--weight", "0.5"], "has no weight"),
])
def test_bad_validator_options_end_in_one_line_and_publish_nothing(args, message, tmp_path, cli_runner):
    result = cli_runner("merge", base_path("llama"), adapter_path("llama-lora"), tmp_path / "out", *args)
    assert result.exit_code == 2, result.output
    last = result.stderr.strip().splitlines()[-1]  # click prints its usage lines above a bad option
    assert last.startswith("Error:") and message in last and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_validators_are_listed_with_their_options(cli_runner):
    data = json.loads(cli_runner("plugins", "--json").stdout)
    provided = {v for row in data["plugins"] for v in row["validators"]}
    assert {"logits", "generate", "perplexity"} <= provided
    for command in ("merge", "unmerge", "swap", "check"):
        help_text = " ".join(cli_runner(command, "--help").stdout.split())
        assert "--eval-text STR Evaluation text (.txt or .jsonl). [--check generate, logits, perplexity]" in help_text
