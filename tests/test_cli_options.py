"""Every option value a user can mistype ends in one line on stderr, exit 2, nothing written (issue 13's
command-line cases): the shared click types refuse them before any file is opened."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT, adapter_path, base_path

LLAMA, LORA = str(base_path("llama")), str(adapter_path("llama-lora"))
TEXT = str(ROOT / "fixtures" / "text" / "GPL-3.txt")

CASES = {
    "shard-size-inf": ["merge", LLAMA, LORA, "{out}", "--shard-size", "inf"],
    "shard-size-negative": ["merge", LLAMA, LORA, "{out}", "--shard-size", "-5MB"],
    "shard-size-zero": ["dequantize", str(base_path("llama-nf4")), "{out}", "--shard-size", "0"],
    "device-bogus": ["merge", LLAMA, LORA, "{out}", "--device", "bogus"],
    "device-meta": ["merge", LLAMA, LORA, "{out}", "--device", "meta"],
    "weight-nan": ["merge", LLAMA, LORA, "{out}", "--weight", "nan"],
    "weight-inf": ["merge", LLAMA, LORA, "{out}", "--weight", "inf"],
    "workers-negative": ["merge", LLAMA, LORA, "{out}", "--workers", "-1"],
    "check-option-not-a-pair": ["merge", LLAMA, LORA, "{out}", "--check", "perplexity", "--check-option", "x"],
    "check-option-unknown": ["merge", LLAMA, LORA, "{out}", "--check", "perplexity", "--eval-text", TEXT,
                             "--check-option", "nope=1"],
    "check-option-nan": ["merge", LLAMA, LORA, "{out}", "--check", "perplexity", "--eval-text", TEXT,
                         "--ppl-tolerance", "nan"],
    "check-flag-without-check": ["merge", LLAMA, LORA, "{out}", "--eval-text", TEXT],
    "eval-window-zero": ["eval", LLAMA, "--eval-text", TEXT, "--window", "0"],
    "eval-window-negative": ["eval", LLAMA, "--eval-text", TEXT, "--window", "-8"],
    "eval-max-tokens-zero": ["eval", LLAMA, "--eval-text", TEXT, "--max-tokens", "0"],
    "eval-max-tokens-one": ["eval", LLAMA, "--eval-text", TEXT, "--max-tokens", "1"],
    "init-rank-zero": ["init", LLAMA, "{out}", "--rank", "0", "--targets", "q_proj"],
    "init-rank-negative": ["init", LLAMA, "{out}", "--rank", "-2", "--targets", "q_proj"],
    "init-alpha-nan": ["init", LLAMA, "{out}", "--rank", "2", "--alpha", "nan", "--targets", "q_proj"],
    "resize-rank-zero": ["resize", LORA, "{out}", "--rank", "0"],
    "resize-rank-negative": ["resize", LORA, "{out}", "--rank", "-3"],
    "extract-rank-zero": ["extract", LLAMA, LLAMA, "{out}", "--rank", "0"],
    "extract-energy-two": ["extract", LLAMA, LLAMA, "{out}", "--energy", "2"],
    "extract-energy-nan": ["extract", LLAMA, LLAMA, "{out}", "--energy", "nan"],
    "combine-rank-zero": ["combine", LORA, LORA, "{out}", "--how", "svd", "--rank", "0"],
    "combine-weight-nan": ["combine", LORA, LORA, "{out}", "--weight", "nan", "--weight", "1"],
    "combine-density-zero": ["combine", LORA, LORA, "{out}", "--how", "ties", "--density", "0"],
    "requantize-unknown-backend": ["requantize", LLAMA, "{out}", "--quant-type", "fp6"],
    "unknown-command": ["mergee", LLAMA],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_option_values_end_in_one_line(name, tmp_path, cli_runner):
    out = tmp_path / "out"
    result = cli_runner(*(a.replace("{out}", str(out)) for a in CASES[name]))
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_convert_into_the_current_folder_with_force_is_refused(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "adapter").symlink_to(adapter_path("llama-lora"))
    (work / "notes.txt").write_text("mine")
    result = subprocess.run([sys.executable, "-m", "adaptools", "convert", "adapter", ".", "--to", "peft", "--force"],
                            capture_output=True, text=True, cwd=work, env={**os.environ, "ADAPTOOLS_LOAD_PLUGINS": ""})
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert sorted(p.name for p in work.iterdir()) == ["adapter", "notes.txt"]


def test_non_utf8_evaluation_text_is_one_line(tmp_path, cli_runner):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00 not utf-8 \xc3\x28")
    result = cli_runner("eval", LLAMA, "--eval-text", bad)
    assert result.exit_code == 2 and result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1


def test_usage_errors_name_the_command_to_ask_for_help(cli_runner):
    result = cli_runner("merge", LLAMA, "--dtype", "fp8")
    assert result.exit_code == 2 and "adaptools merge --help" in result.stderr
