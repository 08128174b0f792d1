"""Hardening, round 3 (issue #21): each class of defect found by an adversarial pass, as a test that failed
before its root fix. The hostile files are built here from the real fixtures by small byte-level edits."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest
from conftest import adapter_path, base_path

import adaptools

BOM = b"\xef\xbb\xbf"


def with_bom(path: Path) -> None:
    """Put a UTF-8 byte-order mark in front of a safetensors file's JSON header (length updated)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = BOM + raw[8:8 + n]
    path.write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + n:])


# --- 1. --force never deletes what the command reads -------------------------------------------------------

@pytest.fixture
def adaptools_output(tmp_path, cli_runner) -> Path:
    """A folder adaptools wrote (so --force may replace it), to hide inputs in."""
    out = tmp_path / "out"
    assert cli_runner("convert", adapter_path("llama-lora"), out, "--to", "peft").exit_code == 0
    return out


def test_force_never_replaces_a_folder_holding_the_base_given_by_option(adaptools_output, cli_runner):
    base = adaptools_output / "base"
    shutil.copytree(base_path("llama"), base)
    result = cli_runner("convert", adapter_path("llama-lora"), adaptools_output, "--to", "peft", "--base", base,
                        "--force")
    assert result.exit_code == 2 and "never replaces inputs" in result.stderr
    assert (base / "config.json").is_file()


def test_force_never_replaces_a_folder_holding_a_validator_file(adaptools_output, cli_runner, tmp_path):
    merged = tmp_path / "merged"
    assert cli_runner("merge", base_path("llama"), adapter_path("llama-lora"), merged).exit_code == 0
    text = merged / "held-out.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    result = cli_runner("merge", base_path("llama"), adapter_path("llama-lora"), merged, "--force",
                        "--check", "perplexity", "--eval-text", text)
    assert result.exit_code == 2 and "never replaces inputs" in result.stderr
    assert text.is_file()
    result = cli_runner("merge", base_path("llama"), adapter_path("llama-lora"), merged, "--force",
                        "--check", "perplexity", "--check-option", f"eval_text={text}")
    assert result.exit_code == 2 and text.is_file()


def test_force_never_replaces_the_quantized_base_of_merge_base_original(tmp_path, cli_runner):
    out = tmp_path / "out"
    assert cli_runner("merge", base_path("llama"), adapter_path("llama-lora"), out).exit_code == 0
    nf4 = out / "nf4"
    shutil.copytree(base_path("llama-nf4"), nf4)
    result = cli_runner("merge", nf4, adapter_path("llama-lora"), out, "--merge-base", "original",
                        "--original-base", base_path("llama"), "--force")
    assert result.exit_code == 2 and "never replaces inputs" in result.stderr
    assert (nf4 / "config.json").is_file()


def test_force_still_replaces_an_output_that_holds_no_input(adaptools_output, cli_runner):
    result = cli_runner("convert", adapter_path("llama-lora"), adaptools_output, "--to", "peft", "--force")
    assert result.exit_code == 0, result.output


# --- 5. one line, whatever a file names ----------------------------------------------------------------------

def test_a_huge_name_in_an_error_is_clipped_to_one_short_line():
    error = adaptools.InputError("module " + "x" * 100_000 + " is missing", tensor="y" * 5000, path="/tmp/a")
    line = str(error)
    assert len(line) < 1000 and "\n" not in line
    assert "[100000 characters]" in line and "[5003 characters]" in line and line.endswith(" is missing")


# --- 8. a safetensors header that safetensors itself refuses ------------------------------------------------

def test_a_byte_order_mark_before_an_adapter_header_is_one_clear_line(tmp_path, cli_runner):
    shutil.copytree(adapter_path("llama-lora"), tmp_path / "a")
    with_bom(tmp_path / "a" / "adapter_model.safetensors")
    for command in (("info",), ("check",)):
        result = cli_runner(*command, tmp_path / "a")
        assert result.exit_code == 2, result.output
        assert "byte-order mark" in result.stderr and "Traceback" not in result.output


def test_a_byte_order_mark_before_a_base_shard_header_is_refused_before_writing(tmp_path, cli_runner):
    shutil.copytree(base_path("llama"), tmp_path / "base")
    with_bom(sorted((tmp_path / "base").glob("*.safetensors"))[0])
    result = cli_runner("merge", tmp_path / "base", adapter_path("llama-lora"), tmp_path / "out")
    assert result.exit_code == 2 and "byte-order mark" in result.stderr
    assert not (tmp_path / "out").exists()


# --- 6. every output adaptools writes, adaptools reads back ----------------------------------------------------

LORA = adapter_path("llama-lora")
ADAPTER_OUTPUTS = [  # (command line before OUT, command line after OUT, whether it writes a folder)
    (("convert", LORA), ("--to", "schema"), False),
    (("convert", LORA), ("--to", "peft"), True),
    (("convert", LORA), ("--to", "gguf", "--base", base_path("llama")), False),
    (("convert", adapter_path("llama-loha")), ("--to", "lora"), True),
    (("combine", LORA, LORA), ("--to", "schema"), False),
    (("combine", LORA, LORA), ("--to", "peft"), True),
    (("resize", LORA), ("--rank", "2"), False),
    (("resize", LORA), ("--rank", "2", "--to", "peft"), True),
    (("extract", base_path("llama")), ("--rank", "2"), True),
]


# a GGUF file named .safetensors is not asked for; a folder named .safetensors is refused (the test after this one)
CASES = [(b, a, suffix) for b, a, folder in ADAPTER_OUTPUTS for suffix in ("", ".safetensors", ".out")
         if suffix != ".safetensors" or not (folder or "gguf" in a)]
FOLDER_CASES = [(b, a) for b, a, folder in ADAPTER_OUTPUTS if folder]


@pytest.mark.parametrize(("before", "after", "suffix"), CASES,
                         ids=[f"{b[0]}-{'-'.join(map(str, a))[:24]}-{s or 'none'}" for b, a, s in CASES])
def test_every_adapter_output_reads_back(tmp_path, cli_runner, before, after, suffix):
    if before[0] == "extract":  # extract BASE TUNED OUT: a tuned model that differs from the base
        tuned = tmp_path / "tuned"
        assert cli_runner("merge", base_path("llama"), LORA, tuned).exit_code == 0
        before = (*before, tuned)
    out = tmp_path / f"written{suffix}"
    result = cli_runner(*before, out, *after)
    assert result.exit_code == 0, result.output
    adapter = adaptools.load(out)
    assert adapter.tensor_names()
    assert cli_runner("check", out).exit_code in (0, 1)  # read and linted; findings are not the point here


@pytest.mark.parametrize(("before", "after"), [*FOLDER_CASES, (
    ("init", base_path("llama")), ("--method", "pissa", "--rank", "2", "--targets", "q_proj"))],
    ids=[f"{b[0]}-{'-'.join(map(str, a))[:24]}" for b, a in [*FOLDER_CASES, (("init",), ("pissa",))]])
def test_a_folder_output_named_like_a_file_is_refused_before_any_work(tmp_path, cli_runner, before, after):
    """`extract`'s default --to peft writes a folder: given lora.safetensors it once made a folder of that name,
    which other loaders then fail to open as the file its name says. Refused in one line, nothing written."""
    if before[0] == "extract":
        before = (*before, base_path("llama"))  # refused before the two models are compared
    out = tmp_path / "lora.safetensors"
    result = cli_runner(*before, out, *after)
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "file's suffix" in result.stderr
    assert "lora.safetensors" in result.stderr and list(tmp_path.iterdir()) == []
