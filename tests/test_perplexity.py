"""The validation hook and the perplexity check, on the fixtures: passes a correct merge, fails broken ones."""

from __future__ import annotations

import json

import pytest
from conftest import FIXTURES, adapter_path, base_path

import adaptools
from adaptools import MergeInput, merge
from adaptools.plugin import ValidationContext

TEXT = FIXTURES / "text" / "GPL-3.txt"
OPTIONS = {"eval_text": str(TEXT), "max_tokens": 3000}


def check(base, adapters, output, **options):
    context = ValidationContext("merge", str(base), adapters, str(output), {**OPTIONS, **options})
    return adaptools.plugin.get_validator("perplexity").validate(context)


@pytest.fixture(scope="module")
def lora():
    return adaptools.load(adapter_path("llama-lora"))


def test_correct_merge_passes(lora, tmp_path):
    merge(base_path("llama"), [MergeInput(lora)], tmp_path / "ok")
    verdict = check(base_path("llama"), [lora], tmp_path / "ok")
    assert verdict.passed, verdict.message
    figures = verdict.figures
    assert figures["tokens"] == 2976  # 3000 tokens in windows of 128 (the model's context): 24 windows, one fewer each
    assert figures["relative_difference"] < 1e-6
    assert abs(figures["base"] - figures["unmerged"]) / figures["base"] > 0.01  # the adapter matters


def test_wrong_scale_fails(lora, tmp_path):
    merge(base_path("llama"), [MergeInput(lora, 0.5)], tmp_path / "half")
    verdict = check(base_path("llama"), [lora], tmp_path / "half")
    assert not verdict.passed
    assert verdict.figures["relative_difference"] > 0.005


def test_dropped_module_fails(lora, tmp_path):
    dropped = adaptools.Adapter("lora", lora.config, adaptools.plugin.MemoryStore({
        n: lora.tensor(n) for n in lora.tensor_names() if ".layers.0." not in n}))  # a layer lost to a name mismatch
    merge(base_path("llama"), [MergeInput(dropped)], tmp_path / "dropped")
    assert not check(base_path("llama"), [lora], tmp_path / "dropped").passed


def test_nothing_merged_fails(lora, tmp_path):
    merge(base_path("llama"), [], tmp_path / "nothing")
    assert not check(base_path("llama"), [lora], tmp_path / "nothing").passed


def test_cli_failed_check_exits_1_keeps_output_and_marks_it(tmp_path, cli_runner):
    out = tmp_path / "out"
    result = cli_runner("merge", base_path("qwen2"), adapter_path("qwen2-lora-bias"), out, "--check", "perplexity",
                        "--eval-text", TEXT, "--max-tokens", "2000", "--ppl-tolerance", "0", "--json")
    assert result.exit_code == 1, result.output
    assert "a check failed" in result.stderr and str(out) in result.stderr
    data = json.loads(result.stdout)
    assert data["checks"][0]["passed"] is False
    recorded = json.loads((out / "adaptools_checks.json").read_text())
    assert recorded[0]["name"] == "perplexity" and recorded[0]["passed"] is False
    assert "CHECK FAILED: perplexity" in (out / "README.md").read_text()


def test_cli_check_passes_and_records(tmp_path, cli_runner):
    out = tmp_path / "out"
    result = cli_runner("merge", base_path("gpt2"), adapter_path("gpt2-lora"), out, "--check", "perplexity",
                        "--eval-text", TEXT, "--max-tokens", "2000")
    assert result.exit_code == 0, result.output
    assert "check perplexity: passed" in result.stdout
    assert json.loads((out / "adaptools_checks.json").read_text())[0]["passed"] is True


def test_check_needs_eval_text(tmp_path, cli_runner):
    result = cli_runner("merge", base_path("llama"), adapter_path("llama-lora"), tmp_path / "o", "--check",
                        "perplexity")
    assert result.exit_code == 2 and "--eval-text" in result.stderr


def test_eval_command(tmp_path, cli_runner):
    plain = json.loads(cli_runner("eval", base_path("llama"), "--eval-text", TEXT, "--max-tokens", "1000",
                                  "--json").stdout)
    tuned = json.loads(cli_runner("eval", base_path("llama"), "--adapter", adapter_path("llama-lora"), "--eval-text",
                                  TEXT, "--max-tokens", "1000", "--json").stdout)
    assert plain["tokens"] == tuned["tokens"] == 992
    assert plain["perplexity"] != tuned["perplexity"]
    jsonl = tmp_path / "eval.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": p}) for p in TEXT.read_text().split("\n\n")[:40]))
    result = cli_runner("eval", base_path("llama"), "--eval-text", jsonl, "--max-tokens", "500")
    assert result.exit_code == 0 and result.stdout.startswith("perplexity ")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": 1}\n')
    result = cli_runner("eval", base_path("llama"), "--eval-text", bad)
    assert result.exit_code == 2 and "text field" in result.stderr


def test_4bit_base_uses_the_4bit_model_with_the_adapter(lora, tmp_path):
    merge(base_path("llama-nf4"), [MergeInput(lora)], tmp_path / "deq-merge")
    verdict = check(base_path("llama-nf4"), [lora], tmp_path / "deq-merge")
    assert verdict.figures["base_is_4bit"] is True
    assert verdict.passed, verdict.message


def test_progress_bar_only_on_a_terminal(monkeypatch):
    import io
    import sys

    from adaptools_plugins.validators.loading import tokenize
    from adaptools_plugins.validators.perplexity import evaluate

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    ids = tokenize(base_path("llama"), (FIXTURES / "text" / "GPL-3.txt").read_text()[:2000], 600)
    for stream, shown in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        evaluate(base_path("llama"), ids, [], 128)
        assert ("scoring llama" in stream.getvalue()) is shown
