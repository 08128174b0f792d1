"""NF4/FP4: byte identity with bitsandbytes' quantize_4bit, exact decoding, and 4-bit checkpoints."""

from __future__ import annotations

import itertools
import json
import logging

import pytest
import torch
from conftest import adapter_path, base_path
from peft_oracle import load_base, logits, peft_model
from safetensors.torch import load_file

import adaptools
from adaptools_plugins.bitsandbytes import nf4 as nf4

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
F = nf4.bnb_functional()
NF4_BASE = base_path("llama-nf4")

CASES = list(itertools.product(
    [torch.bfloat16, torch.float16, torch.float32], [32, 64, 128, 256, 512, 1024, 2048, 4096], ["nf4", "fp4"],
    [True, False]))
SHAPES = [(96, 128), (1000, 77), (3, 5)]


def sample(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=gen) * 0.02
    a[0, : min(4, shape[1])] = 0.0  # a partly zero block
    if a.numel() > 200:
        a.view(-1)[64:128] = 0.0  # an all-zero block at bs 64
    return a.to(dtype)


def same_as_bnb(a, bs, qt, dq):
    p1, s1 = F.quantize_4bit(a, blocksize=bs, quant_type=qt, compress_statistics=dq)
    p2, s2 = nf4.quantize_4bit(a, blocksize=bs, quant_type=qt, double_quant=dq)
    assert torch.equal(p1, p2)
    assert torch.equal(s1.absmax, s2.absmax)
    if dq:
        assert torch.equal(s1.state2.absmax, s2.nested_absmax)
        assert s1.offset.item() == s2.nested_offset
        assert torch.equal(s1.state2.code, s2.nested_quant_map)
    return p2, s2


def test_dynamic_map_is_bitsandbytes_own():
    assert torch.equal(nf4.dynamic_map(), F.create_dynamic_map(signed=True).float())


@pytest.mark.parametrize("seed", range(6))
def test_nested_8bit_codes_are_byte_identical_to_bitsandbytes(seed):
    """Double quantization's 8-bit codes, without bitsandbytes: its CPU quantize_blockwise picks codes
    through a 16-bit grid (docs/nf4.md, "Double quantization"), which differs from the nearest code for
    ~0.2% of values."""
    gen = torch.Generator().manual_seed(seed)
    for n in (1, 255, 256, 257, 5000, 70_001):
        x = torch.randn(n, generator=gen) * (0.5 + seed)
        if seed % 2:
            x = x.abs() - x.abs().mean()  # shaped like absmax - offset
        if n > 600:
            x[256:512] = 0.0  # an all-zero nested block
        codes, absmax = nf4.quantize_nested(x)
        want_codes, want_state = F.quantize_blockwise(x, blocksize=256)
        assert torch.equal(codes, want_codes) and torch.equal(absmax, want_state.absmax), n


@pytest.mark.parametrize(("dtype", "bs", "qt", "dq"), CASES)
def test_quantize_is_byte_identical_to_bitsandbytes(dtype, bs, qt, dq):
    for i, shape in enumerate(SHAPES):
        packed, state = same_as_bnb(sample(shape, dtype, i + bs), bs, qt, dq)
        ref = reference_dequantize(packed, state)
        assert torch.equal(nf4.dequantize_4bit(packed, state), ref)


def reference_dequantize(packed, state):
    """docs/nf4.md, "Decoding", spelled out: code[nibble] * absmax over flat blocks in fp32, one rounding."""
    n = torch.Size(state.shape).numel()
    raw = packed.reshape(-1).view(torch.uint8)
    nibbles = torch.stack([raw >> 4, raw & 15], 1).reshape(-1)[:n].long()
    absmax = state.absmax_f32().repeat_interleave(state.blocksize)[:n]
    return (nf4.code_table(state.quant_type)[nibbles] * absmax).to(state.dtype).reshape(state.shape)


def test_nested_offset_does_not_depend_on_the_thread_count():
    """bitsandbytes' offset is absmax.mean() on torch's threads; on this weight one and two threads round the
    sum differently (one ulp, and absmax codes change). We always sum in one thread's order."""
    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(5632, 2048, generator=gen) * 0.019).to(torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        p1, s1 = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        torch.set_num_threads(2)
        _, s2 = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        assert s1.offset.item() != s2.offset.item()  # the hazard is real on this weight
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            packed, ours = nf4.quantize_4bit(w, 64, "nf4", True)
            assert ours.nested_offset == s1.offset.item()
            assert torch.equal(ours.absmax, s1.absmax) and torch.equal(packed, p1)
    finally:
        torch.set_num_threads(threads)


def test_exact_ties_go_to_the_lower_code():
    mid, _ = nf4.bounds("nf4")
    a = torch.cat([torch.tensor([1.0]), mid]).reshape(1, 16)  # absmax 1: scaled values are the midpoints
    same_as_bnb(a, 32, "nf4", False)


def test_pure_torch_fallback_gives_the_same_bytes(monkeypatch):
    a = sample((130, 70), torch.bfloat16, 7)
    native = nf4.quantize_4bit(a, 64, "nf4", True)
    monkeypatch.setattr(nf4, "NATIVE", None)
    fallback = nf4.quantize_4bit(a, 64, "nf4", True)
    assert torch.equal(native[0], fallback[0]) and torch.equal(native[1].absmax, fallback[1].absmax)
    assert torch.equal(nf4.dequantize_4bit(*fallback), reference_dequantize(*native))


def test_we_avoid_bitsandbytes_cpu_dequant_bug():
    """bnb 0.50.2's CPU kernel indexes absmax per row: wrong when ncols % blocksize != 0
    (docs/nf4.md, "Per-row absmax indexing")."""
    a = sample((64, 80), torch.bfloat16, 3)  # 80 % 16 == 0 but 80 % 64 != 0
    packed, state = nf4.quantize_4bit(a, 64, "nf4", False)
    ours = nf4.dequantize_4bit(packed, state)
    assert torch.equal(ours, reference_dequantize(packed, state))
    assert (ours.float() - a.float()).norm() / a.float().norm() < 0.15


def test_fixture_checkpoint_reencodes_byte_for_byte():
    """Re-quantizing the bf16 original with our encoder reproduces the transformers-saved 4-bit file."""
    stored = load_file(str(NF4_BASE / "model.safetensors"))
    original = {k: v.to(torch.bfloat16) for k, v in load_base(base_path("llama")).state_dict().items()}
    params = [k[: -len(".quant_state.bitsandbytes__nf4")] for k in stored if k.endswith("bitsandbytes__nf4")]
    assert len(params) == 14
    for param in params:
        packed, state = nf4.quantize_4bit(original[param], 64, "nf4", True)
        ours = state.to_state_dict(param, packed)
        theirs = {k: v for k, v in stored.items() if k == param or k.startswith(param + ".")}
        assert sorted(ours) == sorted(theirs)
        for key in theirs:
            assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
        decoded = nf4.dequantize_4bit(stored[param], nf4.QuantState.from_state_dict(param, stored))
        assert torch.equal(decoded, reference_dequantize(packed, state))


def test_dequantize_command_matches_transformers_dequantize(tmp_path, cli_runner):
    from transformers import AutoModelForCausalLM

    result = cli_runner("dequantize", NF4_BASE, tmp_path / "dense")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "quantization_config" not in config
    ours = load_base(tmp_path / "dense", torch.bfloat16).state_dict()
    theirs = AutoModelForCausalLM.from_pretrained(NF4_BASE, device_map="cpu").dequantize(dtype=torch.bfloat16)
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours[key], value.to(torch.bfloat16)), key


def test_dequantize_refuses_a_dense_checkpoint(tmp_path, cli_runner):
    result = cli_runner("dequantize", base_path("llama"), tmp_path / "x")
    assert result.exit_code == 2 and "nothing to dequantize" in result.stderr
    assert not (tmp_path / "x").exists()


def test_merge_into_4bit_base_is_dequantize_then_merge(tmp_path):
    from adaptools import MergeInput, merge

    adapter = adaptools.load(adapter_path("llama-lora"))
    merge(NF4_BASE, [MergeInput(adapter)], tmp_path / "direct")
    merge(NF4_BASE, [], tmp_path / "dense", operation="dequantize")
    merge(tmp_path / "dense", [MergeInput(adapter)], tmp_path / "two-step")
    direct = load_file(str(tmp_path / "direct" / "model.safetensors"))
    two_step = load_file(str(tmp_path / "two-step" / "model.safetensors"))
    assert sorted(direct) == sorted(two_step)
    assert all(torch.equal(direct[k], two_step[k]) for k in direct)
    assert direct["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    # and the merged model behaves like the dequantized base with the adapter unmerged
    expected = logits(peft_model(tmp_path / "dense", adapter_path("llama-lora"), dtype=torch.float32))
    got = logits(load_base(tmp_path / "direct"))
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_cuda_quantize_and_dequantize_match_cpu():
    a = sample((256, 512), torch.bfloat16, 11)
    packed_cpu, state_cpu = nf4.quantize_4bit(a, 64, "nf4", False)
    packed_gpu, state_gpu = nf4.quantize_4bit(a.cuda(), 64, "nf4", False)
    assert torch.equal(packed_cpu, packed_gpu.cpu())
    assert torch.equal(nf4.dequantize_4bit(packed_gpu, state_gpu).cpu(), nf4.dequantize_4bit(packed_cpu, state_cpu))


# --- 4-bit output ---------------------------------------------------------------------------------------


def state_of(folder):
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


@pytest.fixture(scope="module")
def llama_bf16(tmp_path_factory):
    from adaptools import merge

    out = tmp_path_factory.mktemp("bf16") / "llama-bf16"
    merge(base_path("llama"), [], out, dtype="bf16")
    return out


def test_requantize_reproduces_transformers_4bit_checkpoint(llama_bf16, tmp_path, cli_runner):
    result = cli_runner("requantize", llama_bf16, tmp_path / "q")
    assert result.exit_code == 0, result.output
    theirs = load_file(str(NF4_BASE / "model.safetensors"))
    ours_merged = state_of(tmp_path / "q")
    assert sorted(ours_merged) == sorted(theirs)
    for key, value in theirs.items():
        assert ours_merged[key].dtype == value.dtype and torch.equal(ours_merged[key], value), key
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    reference = json.loads((NF4_BASE / "config.json").read_text())["quantization_config"]
    assert config["quantization_config"] == reference
    assert len(list((tmp_path / "q").glob("*.safetensors"))) == 4  # the base's shard layout is kept


def test_requantize_defaults_to_nf4_whatever_order_plugins_registered_in(monkeypatch):
    """Without --quant-type, requantize makes NF4 (transformers' load_in_4bit) because that backend says so,
    not because it was registered first: reversed, the choice holds (tests that reload plugins did reorder
    them, and requantize then chose another format)."""
    from adaptools import registry
    from adaptools.engine.plan import quantizing_backend

    order = registry.backends()
    assert quantizing_backend("").name == "nf4"
    monkeypatch.setattr(registry, "backends", lambda: dict(reversed(list(order.items()))))
    assert quantizing_backend("").name == "nf4"


def test_requantized_output_loads_and_runs_in_transformers(llama_bf16, tmp_path):
    from transformers import AutoModelForCausalLM

    from adaptools import MergeInput, merge

    merge(NF4_BASE, [MergeInput(adaptools.load(adapter_path("llama-lora")))], tmp_path / "rq", requantize=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "rq", device_map="cpu")
    # keep bitsandbytes' CPU forward from repacking weights (docs/nf4.md, "Weight repacking in the CPU forward")
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert torch.isfinite(logits(model)).all()


def test_merge_requantize_copies_untouched_layers_and_reports_survival(tmp_path, cli_runner):
    result = cli_runner("merge", NF4_BASE, adapter_path("llama-layers"), tmp_path / "rq", "--requantize", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert sorted(s["tensor"] for s in data["survival"]) == [
        "model.layers.1.self_attn.o_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    ours, theirs = state_of(tmp_path / "rq"), load_file(str(NF4_BASE / "model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    touched = ("model.layers.1.self_attn.o_proj.weight", "model.layers.1.self_attn.q_proj.weight")
    for key in theirs:
        if key.startswith(touched):
            continue
        assert torch.equal(ours[key], theirs[key]), key
    # a touched layer is exactly quantize(dequant(W4) + delta) with the same settings
    from adaptools import MergeInput, merge

    merge(NF4_BASE, [MergeInput(adaptools.load(adapter_path("llama-layers")))], tmp_path / "dense")
    dense = load_file(str(tmp_path / "dense" / "model.safetensors"))
    for name in touched:
        packed, state = nf4.quantize_4bit(dense[name], 64, "nf4", True)
        assert torch.equal(ours[name], packed) and torch.equal(ours[f"{name}.absmax"], state.absmax), name


def test_survival_reports_the_rounding_error_against_the_change(tmp_path, cli_runner):
    """Besides the share kept, each changed layer's report gives the error re-encoding added against the change,
    ‖deq(q(W+Δ)) − (W+Δ)‖ / ‖Δ‖, computed here from the dense merge and the requantized output decoded by
    bitsandbytes' rule; the text summary gives its median."""
    from adaptools import MergeInput, merge

    result = cli_runner("merge", NF4_BASE, adapter_path("llama-layers"), tmp_path / "rq", "--requantize", "--json")
    assert result.exit_code == 0, result.output
    merge(NF4_BASE, [MergeInput(adaptools.load(adapter_path("llama-layers")))], tmp_path / "dense")
    merge(NF4_BASE, [], tmp_path / "base")
    dense, base = load_file(str(tmp_path / "dense" / "model.safetensors")), state_of(tmp_path / "base")
    merge(tmp_path / "rq", [], tmp_path / "rq-dense")
    again = state_of(tmp_path / "rq-dense")
    for s in json.loads(result.stdout)["survival"]:
        name = s["tensor"]
        change = (dense[name].float() - base[name].float()).norm()
        expected = float((again[name].float() - dense[name].float()).norm() / change)
        assert s["error"] == pytest.approx(expected, rel=1e-4) and 0 < s["error"], name
    text = cli_runner("merge", NF4_BASE, adapter_path("llama-layers"), tmp_path / "rq2", "--requantize")
    assert "median rounding error" in text.stdout, text.output


def test_small_deltas_are_erased_by_requantizing_and_we_say_so(tmp_path, cli_runner):
    result = cli_runner("merge", NF4_BASE, adapter_path("llama-lora"), tmp_path / "rq", "--requantize",
                        "--weight", "0.003")
    assert result.exit_code == 0
    assert "WARNING" in result.stderr and "lost the fine-tune" in result.stderr


def test_merge_base_original_lands_on_the_16bit_weights(llama_bf16, tmp_path, cli_runner):
    assert cli_runner("merge", NF4_BASE, adapter_path("llama-lora"), tmp_path / "x", "--merge-base",
                      "original").exit_code == 2
    result = cli_runner("merge", NF4_BASE, adapter_path("llama-lora"), tmp_path / "orig", "--merge-base", "original",
                        "--original-base", llama_bf16)
    assert result.exit_code == 0, result.output
    direct = cli_runner("merge", llama_bf16, adapter_path("llama-lora"), tmp_path / "direct")
    assert direct.exit_code == 0
    a, b = state_of(tmp_path / "orig"), state_of(tmp_path / "direct")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    result = cli_runner("merge", NF4_BASE, adapter_path("llama-lora"), tmp_path / "orig4", "--merge-base",
                        "original", "--original-base", llama_bf16, "--requantize")
    assert result.exit_code == 0, result.output
    assert "quantization_config" in json.loads((tmp_path / "orig4" / "config.json").read_text())


def test_requantize_refusals(tmp_path, cli_runner):
    result = cli_runner("requantize", NF4_BASE, tmp_path / "a")
    assert result.exit_code == 2 and "already quantized" in result.stderr
    result = cli_runner("requantize", base_path("gpt2"), tmp_path / "b")
    assert result.exit_code == 2 and "Conv1D" in result.stderr
    result = cli_runner("merge", base_path("llama"), adapter_path("llama-lora"), tmp_path / "c", "--requantize")
    assert result.exit_code == 2 and "needs a quantized base" in result.stderr
    assert not any((tmp_path / n).exists() for n in "abc")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_native_decoder_matches_reference_when_bitsandbytes_is_not_loaded(quant_type, monkeypatch):
    """Without bitsandbytes imported, decoding uses our C kernel for every shape; same bits as the reference."""
    import sys

    monkeypatch.delitem(sys.modules, "bitsandbytes.functional", raising=False)
    for i, (shape, dtype) in enumerate([((96, 128), torch.bfloat16), ((64, 80), torch.float16),
                                        ((33, 65), torch.float32)]):
        packed, state = nf4.quantize_4bit(sample(shape, dtype, 40 + i), 64, quant_type, True)
        assert torch.equal(nf4.dequantize_4bit(packed, state), reference_dequantize(packed, state))
