"""The IQ4_NL and IQ4_XS encoders (plugins/gguf/iq4.py, plugins/gguf/csrc/gguf_iq4.c); docs/gguf.md, "IQ4
encoders".

Fast: the bytes of a fixed set of hard rows hash to what ggml's quantizer gave (recorded from it by the slow
test below), the native kernel gives the numpy encoder's bytes and gguf-py's decoded values, what is encoded
decodes within the type's rounding, partial blocks fall back to F16, and a merge into an IQ4_XS or IQ4_NL
GGUF keeps the type of the tensors it changes, with --imatrix as the weighted encoder's bytes; hostile IQ4
blocks (non-finite scales, a truncated tensor) are refused in one line.

Slow (llamacpp): byte identity against llama.cpp's own ``ggml_quantize_chunk`` (the function llama-quantize
calls) with and without importance weights, for both encoders; and a merge into an IQ4_XS base made by
llama.cpp equals ``llama_model_quantize`` of the exact merge tensor for tensor, and loads in llama.cpp.
"""

from __future__ import annotations

import hashlib
import json
import sys

import gguf
import numpy as np
import pytest
import torch
from conftest import FIXTURES
from gguf import GGMLQuantizationType as Q
from gguf_bases import llama_cpp_quantized, raw, write_base
from test_gguf_imatrix import ggml_base, ggml_bytes, weight_kinds  # noqa: F401  (ggml_base: llama.cpp's library)
from test_gguf_kquants import _one_line_refusal, _patched, hard_rows, normal_rows, varied_rows

from adaptools_plugins.gguf import codec as gguf_codec
from adaptools_plugins.gguf import iq4, native

TYPES = [Q.IQ4_NL, Q.IQ4_XS]
#: sha256 of ggml's bytes for :func:`hard_rows` (the slow test checks these against ggml itself).
DIGESTS = {
    "IQ4_NL": "00deb8c32d4a82df74228aa987bfe0d75bf5c3ba4d31ec3d439cb897c65b84c3",
    "IQ4_XS": "90da563a736011f1a590a09bc9a388ad1d1fc089cbc597fbe5f94cdab74d2711",
}
#: Largest error of a decoded value relative to its block's largest magnitude (measured on normal_rows:
#: IQ4_NL 0.070, IQ4_XS 0.080); the step between the two outermost levels is 24 / 127 of it.
BOUND = 2.0**-3
needs_native = pytest.mark.skipif(native.LIB is None, reason="the native GGUF kernel is not built")


def encoders(qtype: Q) -> dict:
    found = {"numpy": lambda values: iq4.quantize(values, qtype.name)}
    if native.LIB is not None:
        found["native"] = lambda values: native.encode(values, qtype)
    return found


# --- fast ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_bytes_of_hard_rows_are_ggmls(qtype):
    """Regression against the digests recorded from ggml (the slow test compares bytes), for both encoders."""
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    for name, encode in encoders(qtype).items():
        data = encode(hard_rows())
        assert data.shape == (hard_rows().shape[0], 256 // gguf.GGML_QUANT_SIZES[qtype][0] * size), name
        assert hashlib.sha256(data.tobytes()).hexdigest() == DIGESTS[qtype.name], name


@needs_native
@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_the_native_kernel_gives_the_numpy_bytes_and_gguf_pys_values(qtype):
    values = np.concatenate([normal_rows(seed=4).reshape(-1, 256), varied_rows(n=20)])
    data = native.encode(values, qtype)
    assert np.array_equal(data, iq4.quantize(values, qtype.name))
    with np.errstate(all="ignore"):
        want = gguf.quants.dequantize(data, qtype)
    assert np.array_equal(native.decode(data, qtype, values.shape), want, equal_nan=True)  # 1e30 rows: inf d
    noise = np.random.default_rng(2).integers(0, 256, data.shape, dtype=np.uint8)  # NaN/Inf scales included
    with np.errstate(all="ignore"):
        want = gguf.quants.dequantize(noise, qtype)
    assert not np.isfinite(want).all()
    assert np.array_equal(native.decode(noise, qtype, values.shape), want, equal_nan=True)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_decoded_values_are_within_the_types_rounding(qtype):
    values = normal_rows()
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    for name, encode in encoders(qtype).items():
        back = gguf.quants.dequantize(encode(values), qtype)
        blocks, errors = values.reshape(-1, block), np.abs(back - values).reshape(-1, block)
        assert (errors.max(axis=1) <= BOUND * np.abs(blocks).max(axis=1)).all(), name
        assert errors.max() > 0
        zeros = gguf.quants.dequantize(encode(np.zeros((2, 512), np.float32)), qtype)
        assert not zeros.any(), name


def test_partial_blocks_fall_back_to_f16_and_other_iq_types_to_q8_0():
    for qtype, row in ((Q.IQ4_XS, 320), (Q.IQ4_NL, 40)):
        with pytest.raises(gguf.QuantError, match=f"{qtype.name} needs rows of whole"):
            gguf_codec.encode(np.zeros((3, row), np.float32), qtype)
        array, got = gguf_codec.encode_with_fallback(np.ones((2, row), np.float32), qtype)
        assert got == Q.F16 and array.dtype == np.float16
        assert gguf_codec.changed_type(qtype, row) == Q.F16
    assert gguf_codec.changed_type(Q.IQ4_XS, 512) == Q.IQ4_XS and gguf_codec.changed_type(Q.IQ4_NL, 96) == Q.IQ4_NL
    assert gguf_codec.changed_type(Q.IQ3_S, 512) == Q.Q8_0


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_without_the_native_kernel_the_same_bytes_come_from_numpy(qtype, monkeypatch):
    values = normal_rows(seed=5)
    want = gguf_codec.encode(values, qtype)
    monkeypatch.setattr(native, "LIB", None)
    assert np.array_equal(gguf_codec.encode(values, qtype), want)


# --- merges into IQ4 bases ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """A seeded 256-wide tiny Llama as IQ4_XS and IQ4_NL GGUFs (our encoder), and a LoRA on three projections."""
    import transformers
    from peft import LoraConfig
    from peft_oracle import seeded_lora

    tmp = tmp_path_factory.mktemp("iq4-bases")
    torch.manual_seed(9)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                      max_position_embeddings=64, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp / "hf")
    seeded_lora(tmp / "hf", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"]),
                tmp / "lora", 4, 0.05)
    return {"lora": tmp / "lora", **{q: write_base(tmp / "hf", tmp / f"base-{q.name}.gguf", q) for q in TYPES}}


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_a_merge_keeps_the_iq4_type_and_loads_back(qtype, bases, tmp_path, cli_runner):
    result = cli_runner("merge", bases[qtype], bases["lora"], tmp_path / "out.gguf", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    before, after = raw(bases[qtype]), raw(tmp_path / "out.gguf")
    changed = sorted(n for n in after if after[n] != before[n])
    assert changed == ["blk.0.attn_k.weight", "blk.0.attn_q.weight", "blk.0.ffn_down.weight"]
    assert all(after[n][0] == before[n][0] == qtype for n in changed) and summary["warnings"] == []
    reader = gguf.GGUFReader(tmp_path / "out.gguf")
    assert all(np.isfinite(gguf_codec.decode(t)).all() for t in reader.tensors)
    assert all(s["retained"] > 0.5 for s in summary["survival"]) and "WARNING" not in result.stderr


@needs_native
def test_a_merge_with_an_imatrix_weights_the_iq4_xs_tensors(bases, tmp_path, cli_runner):
    """--imatrix into an IQ4_XS base: the changed tensors stay IQ4_XS, differ from the unweighted merge, and are
    the weighted encoder's bytes of the merged values (decoded from an F32 merge of the same inputs)."""
    from test_gguf_imatrix import entries_for, write_gguf_imatrix

    from adaptools_plugins.gguf import imatrix

    changed = {"blk.0.attn_q.weight": 256, "blk.0.attn_k.weight": 256, "blk.0.ffn_down.weight": 512}
    matrix = write_gguf_imatrix(tmp_path / "imatrix.gguf", entries_for(changed))
    base = bases[Q.IQ4_XS]
    for name, extra in (("plain", ()), ("out", ("--imatrix", matrix)), ("f32", ("--outtype", "f32"))):
        result = cli_runner("merge", base, bases["lora"], tmp_path / f"{name}.gguf", *extra)
        assert result.exit_code == 0, result.output
        assert "WARNING" not in result.stderr, result.stderr
    unweighted, weighted = raw(tmp_path / "plain.gguf"), raw(tmp_path / "out.gguf")
    weights = imatrix.load(matrix)
    for t in gguf.GGUFReader(tmp_path / "f32.gguf").tensors:
        if t.name in changed:
            values = gguf_codec.decode(t)
            want = native.encode_weighted(values, Q.IQ4_XS, weights.for_tensor(t.name, values.shape))
            assert weighted[t.name] == (Q.IQ4_XS, want.tobytes()), t.name
            assert weighted[t.name][1] != unweighted[t.name][1], t.name


@pytest.mark.parametrize("case,at,value", [("Inf d", 136 * 3, b"\x00\x7c"), ("NaN d", 136 * 5, b"\x00\x7e"),
                                           ("-Inf d", 0, b"\x00\xfc")])
def test_iq4_blocks_with_non_finite_scales_are_refused(case, at, value, bases, tmp_path, cli_runner):
    bad = _patched(bases[Q.IQ4_XS], tmp_path, "blk.0.attn_q.weight", at, value)
    result = cli_runner("merge", bad, bases["lora"], tmp_path / "out.gguf")
    _one_line_refusal(result, tmp_path, "non-finite", "bad.gguf", "q_proj")


def test_truncated_iq4_blocks_are_refused(bases, tmp_path, cli_runner):
    """The file ends 7 bytes into the last IQ4_NL tensor's last block."""
    tensors = gguf.GGUFReader(bases[Q.IQ4_NL]).tensors
    last = max((t for t in tensors if t.tensor_type == Q.IQ4_NL), key=lambda t: t.data_offset)
    bad = _patched(bases[Q.IQ4_NL], tmp_path, last.name, 0, b"", cut=int(last.n_bytes) - 11)
    result = cli_runner("merge", bad, bases["lora"], tmp_path / "out.gguf")
    _one_line_refusal(result, tmp_path, "not a readable GGUF file", f"(IQ4_NL, {int(last.n_bytes)} bytes) ends 11",
                      "bad.gguf", last.name)


# --- slow: llama.cpp itself ------------------------------------------------------------------------------------


def slow_rows() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    scales = np.float32(10.0) ** rng.uniform(-8, 4, (256, 1)).astype(np.float32)
    many = (rng.standard_normal((256, 512)) * scales).astype(np.float32)
    many[::5, ::11] *= 50
    return {"hard": hard_rows().reshape(-1, 512), "varied": varied_rows(n=40).reshape(-1, 512), "many": many,
            "normal": normal_rows(seed=3).reshape(-1, 512),
            "tail": np.ascontiguousarray(varied_rows(n=40).reshape(-1, 256)[:, :32 * 11])}


@pytest.mark.slow
@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_bytes_equal_llama_cpps_quantizer(qtype, ggml_base):  # noqa: F811 (the imported fixture)
    for row_name, values in slow_rows().items():
        if values.shape[1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            continue
        want = ggml_bytes(ggml_base, values, qtype)
        for name, encode in encoders(qtype).items():
            bad = np.nonzero((encode(values) != want).any(axis=1))[0]
            assert not len(bad), f"{row_name} rows ({name}): {len(bad)} of {len(want)} differ, first {bad[:8]}"
    digest = hashlib.sha256(ggml_bytes(ggml_base, hard_rows(), qtype).tobytes()).hexdigest()
    assert digest == DIGESTS[qtype.name], f'"{qtype.name}": "{digest}",'


@pytest.mark.slow
@pytest.mark.llamacpp
@needs_native
@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_weighted_bytes_equal_llama_cpps_quantizer(qtype, ggml_base):  # noqa: F811 (the imported fixture)
    kinds = weight_kinds()
    for row_name, values in slow_rows().items():
        if values.shape[1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            continue
        for kind, full in kinds.items():
            weights = np.ascontiguousarray(full[:values.shape[1]])
            want = ggml_bytes(ggml_base, values, qtype, weights)
            with np.errstate(all="ignore"):
                ours = native.encode_weighted(values, qtype, weights)
            bad = np.nonzero((ours != want).any(axis=1))[0]
            assert not len(bad), f"{row_name} rows, {kind} weights: {len(bad)} of {len(want)} rows differ"
            assert kind == "zeros" or not np.array_equal(want, ggml_bytes(ggml_base, values, qtype)) \
                or row_name == "tail", f"{kind} weights changed nothing on {row_name} rows"


@pytest.mark.slow
@pytest.mark.llamacpp
def test_a_merge_into_llama_quantizes_iq4_xs_equals_llama_quantize_and_loads(tmp_path, cli_runner):
    """A tiny Llama quantized to IQ4_XS by llama.cpp, merged: every changed IQ4_XS tensor keeps its type and
    is the bytes llama.cpp's quantizer makes of the exact merge (the same merge with --outtype f32), and
    llama.cpp loads the result and gives finite logits."""
    sys.path.insert(0, str(FIXTURES))
    import llamacpp

    base, _ = llama_cpp_quantized(tmp_path, "iq4_xs", 13)
    out, exact = tmp_path / "out.gguf", tmp_path / "exact.gguf"
    result = cli_runner("merge", base, tmp_path / "lora", out, "--json")
    assert result.exit_code == 0, result.output
    assert cli_runner("merge", base, tmp_path / "lora", exact, "--outtype", "f32").exit_code == 0
    ref = llamacpp.quantize(exact, tmp_path / "ref.gguf", "iq4_xs")
    before, got, want = raw(base), raw(out), raw(ref)
    changed = [n for n in got if got[n] != before[n]]
    assert len(changed) == 14 and all(got[n][0] == before[n][0] for n in changed)
    iq4_xs = [n for n in changed if got[n][0] == Q.IQ4_XS]
    assert len(iq4_xs) >= 10, {n: got[n][0].name for n in changed}
    for name in changed:
        assert got[name] == want[name], name
    runs, log = llamacpp.logits(out, [None], [[1, 5, 9, 33, 70]], tmp_path / "logits.npy")
    assert runs is not None and np.isfinite(runs).all(), log[-3000:]
