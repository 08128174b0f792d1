"""`--check logits` on a GGUF output: the merged file against the base GGUF with the adapter applied at runtime
by llama.cpp, in llama.cpp (llama-cpp-python from the cached build, put on this process's path)."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from conftest import ADAPTERS, BASES, FIXTURES

import adaptools
from adaptools.plugin import ValidationContext

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]

sys.path.insert(0, str(FIXTURES))
import llamacpp  # noqa: E402


@pytest.fixture(scope="module")
def bases():
    """llama.cpp's own conversions of the tiny llama, with llama_cpp importable here."""
    llamacpp.python()
    site = next((llamacpp.VENV / "lib").glob("python*/site-packages"))
    sys.path.append(str(site))  # last: this environment's own packages stay first
    cache = llamacpp.CACHE / "gguf"
    yield {t: llamacpp.convert_base(BASES / "llama", cache / f"tiny-llama-{t}.gguf", t) for t in ("f32", "f16", "q8_0")}
    sys.path.remove(str(site))


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_a_gguf_merge_passes_the_logits_check_in_llama_cpp(outtype, bases, tmp_path, cli_runner):
    out = tmp_path / "merged.gguf"
    result = cli_runner("merge", bases[outtype], ADAPTERS / "llama-lora", out, "--check", "logits", "--json")
    assert result.exit_code == 0, result.output
    check = json.loads(result.stdout)["checks"][0]
    figures = check["figures"]
    print(outtype, figures["max_abs_logit_diff"], figures["tolerance"]["max_logit"],
          figures["adapter_effect"]["max_abs_logit_diff"])
    assert check["passed"] and figures["runtime"] == "llama.cpp" and figures["tolerance"]["dtype"] == outtype.upper()
    # the check can tell: the adapter moves the logits far beyond the tolerance it grants the merge
    assert figures["adapter_effect"]["max_abs_logit_diff"] > 10 * figures["tolerance"]["max_logit"]
    assert figures["max_abs_logit_diff"] < figures["tolerance"]["max_logit"]


def test_a_split_output_passes_the_logits_check_from_its_first_part(bases, tmp_path, cli_runner):
    """--shard-size: the check loads the set from its first part (llama.cpp finds the others), with the
    tolerance of the set's weight type, Q8_0 (counted over every part)."""
    result = cli_runner("merge", bases["q8_0"], ADAPTERS / "llama-lora", tmp_path / "merged.gguf", "--shard-size",
                        "40KB", "--check", "logits", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["output"].endswith(f"merged-00001-of-{summary['shards']:05d}.gguf") and summary["shards"] > 1
    check = summary["checks"][0]
    assert check["passed"] and check["figures"]["tolerance"]["dtype"] == "Q8_0"


def test_an_output_without_the_adapter_fails_it(bases, tmp_path):
    """The base itself passed off as the merge: the check must fail (a check that cannot fail is a defect)."""
    from adaptools_plugins.validators.logits import Logits

    output = tmp_path / "not-merged.gguf"
    shutil.copyfile(bases["f16"], output)
    context = ValidationContext("merge", str(bases["f16"]), [adaptools.load(ADAPTERS / "llama-lora")], str(output),
                                {"weights": [1.0], "removed": [False]})
    verdict = Logits().validate(context)
    assert not verdict.passed and "does not behave like the reference" in verdict.message


def test_a_method_llama_cpp_cannot_apply_is_refused_in_one_line(bases, tmp_path, cli_runner):
    out = tmp_path / "merged.gguf"
    result = cli_runner("merge", bases["f32"], ADAPTERS / "llama-loha", out, "--check", "logits")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "llama.cpp" in result.stderr and result.stderr.count("\n") == 1
    assert not out.exists()
