"""The K-quant encoders (plugins/gguf/kquants.py; docs/gguf.md, "K-quant encoders").

Fast: what they encode decodes (by gguf-py) within each type's rounding, re-encoding what was decoded moves
little, rows that are not whole 256-value super-blocks are refused, and the bytes of a fixed set of rows
hash to what ggml's reference quantizer gave (recorded from it by the slow test below). A merge into a GGUF
base whose weights are K-quants keeps their types, loads back, and reports which layers lost the change;
hostile K-quant bases are refused in one line.

Slow (llamacpp): byte identity against ggml itself, ``quantize_row_q*_K_ref`` from ggml-quants.c of the
llama-cpp-python sdist the llama.cpp fixture builds, compiled alone (fixtures/ggml_quants.py), for the numpy
encoders and for the native ones (plugins/gguf/csrc/gguf_kquants.c) where the kernel covers the type.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import sys

import gguf
import numpy as np
import pytest
import torch
from conftest import FIXTURES
from gguf import GGMLQuantizationType as Q
from gguf_bases import raw, write_base

from adaptools_plugins.gguf import codec as gguf_codec
from adaptools_plugins.gguf import kquants, native

TYPES = [Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q3_K, Q.Q2_K]
#: Largest error of a decoded value relative to its 256-value block's largest magnitude (docs/validation.md);
#: measured on normal rows: Q6_K 0.016, Q5_K 0.049, Q4_K 0.085, Q3_K 0.21, Q2_K 0.38.
BOUND = {Q.Q6_K: 2.0**-5, Q.Q5_K: 2.0**-4, Q.Q4_K: 2.0**-3, Q.Q3_K: 2.0**-2, Q.Q2_K: 2.0**-1}
#: sha256 of ggml's bytes for :func:`hard_rows` (the slow test checks these against ggml itself).
DIGESTS = {
    "Q4_K": "31a3eb706a2457d0710a9b52c1da699064e9765ca2f73170159a886f18962e73",
    "Q5_K": "b8109bb840206c98fbd863646af07f61ae9659a9001cb6e79f1a5ac59e59f2c7",
    "Q6_K": "829f86003ebcb7febf927c881dcb26266eab9c073e0890314bd455a3d5e49bfb",
    "Q3_K": "391335f10e29c37435f1f1bba89227132147d9a43509cd1bb8fca40a2f6c3118",
    "Q2_K": "d80a4261685f76e159df5df377eb0b856651e5361ccdd9903c4439c768793497",
}


def hard_rows(seed: int = 0) -> np.ndarray:
    """Super-blocks meant to reach every branch: normal and tiny rows, outliers, zeros, constants, one
    non-zero, ties of magnitude with both signs, subnormals, +-65504 (fp16's largest) and +-FLT_MAX."""
    rng = np.random.default_rng(seed)
    f32max = np.finfo(np.float32).max
    rows = [rng.standard_normal((24, 256)), rng.standard_normal((8, 256)) * 0.02,
            rng.standard_normal((4, 256)) * 1e-6, np.zeros((2, 256)), np.full((1, 256), 3.5),
            np.full((1, 256), -1e-3), np.abs(rng.standard_normal((2, 256))), -np.abs(rng.standard_normal((2, 256))),
            rng.integers(-4, 5, (4, 256)), np.where(rng.random((2, 256)) < 0.5, -1.0, 1.0)]
    outliers = rng.standard_normal((8, 256))
    outliers[:, ::37] *= 100
    one = np.zeros((2, 256))
    one[0, 17], one[1, 200] = 5.0, -5.0
    groups_zero = rng.standard_normal((2, 256))
    groups_zero[:, 32:96] = 0  # whole sub-blocks of zeros beside non-zero ones
    sub = rng.standard_normal((4, 256)) * 1e-40
    big = rng.standard_normal((4, 256))
    big[:, 5], big[:, 9] = 65504.0, -65504.0
    huge = rng.standard_normal((2, 256))
    huge[0, 3], huge[1, 7] = f32max, -f32max
    rows += [outliers, one, groups_zero, sub, big, huge]
    return np.concatenate([np.asarray(r, np.float32) for r in rows]).astype(np.float32)


def normal_rows(shape=(64, 1024), seed=1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(shape).astype(np.float32) * 0.02
    values.reshape(-1)[::97] *= 20  # some outliers
    return values


# --- fast ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_bytes_of_hard_rows_are_ggmls(qtype):
    """Regression against the digests recorded from ggml's reference (the slow test compares bytes)."""
    data = kquants.quantize(hard_rows(), qtype.name)
    assert data.shape == (hard_rows().shape[0], gguf.GGML_QUANT_SIZES[qtype][1])
    assert hashlib.sha256(data.tobytes()).hexdigest() == DIGESTS[qtype.name]


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_decoded_values_are_within_the_types_rounding(qtype):
    values = normal_rows()
    data = gguf_codec.encode(values, qtype)
    assert data.dtype == np.uint8 and data.shape == (64, 1024 // 256 * gguf.GGML_QUANT_SIZES[qtype][1])
    back = gguf.quants.dequantize(data, qtype)
    blocks, errors = values.reshape(-1, 256), np.abs(back - values).reshape(-1, 256)
    assert (errors.max(axis=1) <= BOUND[qtype] * np.abs(blocks).max(axis=1)).all()
    assert errors.max() > 0
    zeros = gguf.quants.dequantize(gguf_codec.encode(np.zeros((2, 512), np.float32), qtype), qtype)
    assert not zeros.any()


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_reencoding_what_was_decoded_moves_little(qtype):
    """encode(decode(encode(x))) is not the same bytes (the scale search starts from other values and may
    land elsewhere; it is no fixed point even after four rounds), but it is bounded: each block moves by less
    than the type's rounding, and in all by less than the first rounding did. Measured on these rows, second
    rounding / first in norm: Q4_K 0.09, Q5_K 0.16, Q6_K 0.14, Q3_K 0.17, Q2_K 0.52; per block at most 0.094
    (Q3_K) of its largest value."""
    values = normal_rows()
    first = gguf.quants.dequantize(gguf_codec.encode(values, qtype), qtype)
    second = gguf.quants.dequantize(gguf_codec.encode(first, qtype), qtype)
    moved = np.abs(second - first).reshape(-1, 256).max(axis=1)
    assert (moved <= BOUND[qtype] * np.abs(first).reshape(-1, 256).max(axis=1)).all()
    assert np.linalg.norm(second - first) <= 0.6 * np.linalg.norm(first - values)


def test_rows_that_are_not_whole_super_blocks_are_refused():
    with pytest.raises(ValueError, match="Q4_K needs rows of whole 256-value blocks") as raised:
        kquants.quantize(np.zeros((2, 128), np.float32), "Q4_K")
    assert "\n" not in str(raised.value)
    with pytest.raises(gguf.QuantError, match="Q6_K needs rows of whole 256-value blocks"):
        gguf_codec.encode(np.zeros((3, 320), np.float32), Q.Q6_K)
    array, qtype = gguf_codec.encode_with_fallback(np.ones((2, 320), np.float32), Q.Q5_K)
    assert qtype == Q.F16 and array.dtype == np.float16  # as llama.cpp's converter falls back
    assert gguf_codec.changed_type(Q.Q4_K, 320) == Q.F16 and gguf_codec.changed_type(Q.Q4_K, 512) == Q.Q4_K


def test_nearest_int_rounds_half_to_even():
    values = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 2.4999998, 4194303.0, -4194303.0, -0.0], np.float32)
    assert kquants.nearest_int(values).tolist() == [0, 2, 2, 0, -2, 2, 4194303, -4194303, 0]


# --- merges into K-quant bases --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A seeded 256-wide tiny Llama, its Q4_K GGUF (our encoder), and a LoRA on three projections."""
    import transformers
    from peft import LoraConfig, get_peft_model
    from peft_oracle import load_base

    tmp = tmp_path_factory.mktemp("kquant-bases")
    torch.manual_seed(7)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                      max_position_embeddings=64, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp / "hf")
    adapters = {}
    for name, std in (("lora", 0.05), ("tiny-lora", 1e-5)):
        peft = get_peft_model(load_base(tmp / "hf"), LoraConfig(r=4, lora_alpha=8,
                                                                target_modules=["q_proj", "k_proj", "down_proj"]))
        with torch.no_grad():
            for n, p in peft.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, std)
        peft.save_pretrained(tmp / name)
        adapters[name] = tmp / name
    return {"hf": tmp / "hf", "base": write_base(tmp / "hf", tmp / "base-q4_k.gguf", Q.Q4_K), **adapters}


def test_a_merge_keeps_the_k_quant_type_and_loads_back(wide, tmp_path, cli_runner):
    result = cli_runner("merge", wide["base"], wide["lora"], tmp_path / "out.gguf", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    before, after = raw(wide["base"]), raw(tmp_path / "out.gguf")
    changed = sorted(n for n in after if after[n] != before[n])
    assert changed == ["blk.0.attn_k.weight", "blk.0.attn_q.weight", "blk.0.ffn_down.weight"]
    assert all(after[n][0] == before[n][0] == Q.Q4_K for n in changed) and summary["warnings"] == []
    reader = gguf.GGUFReader(tmp_path / "out.gguf")  # gguf-py reads it back, every tensor decodes finite
    assert all(np.isfinite(gguf_codec.decode(t)).all() for t in reader.tensors)
    assert {s["tensor"] for s in summary["survival"]} == {
        "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.mlp.down_proj.weight"}
    assert all(s["retained"] > 0.5 for s in summary["survival"]) and "WARNING" not in result.stderr


def test_a_change_that_rounds_away_is_named_with_what_to_do(wide, tmp_path, cli_runner):
    """A delta far below Q4_K's step rounds away: the warning names the layers and says to write the changed
    tensors wider; with --outtype q8_0 it survives and the warning is gone."""
    result = cli_runner("merge", wide["base"], wide["tiny-lora"], tmp_path / "out.gguf")
    assert result.exit_code == 0, result.output
    warning = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warning) == 1 and "lost the fine-tune" in warning[0], result.stderr
    assert "model.layers.0.self_attn.q_proj.weight" in warning[0] and "--outtype q8_0" in warning[0]
    wider = cli_runner("merge", wide["base"], wide["tiny-lora"], tmp_path / "out8.gguf", "--outtype", "q8_0",
                       "--json")
    assert wider.exit_code == 0, wider.output
    assert "WARNING" not in wider.stderr
    assert all(s["retained"] > 0.5 for s in json.loads(wider.stdout)["survival"])


def _patched(base, tmp_path, name: str, at: int, value: bytes, cut: int | None = None):
    data = bytearray(base.read_bytes())
    tensor = next(t for t in gguf.GGUFReader(base).tensors if t.name == name)
    where = tensor.data_offset + at
    data[where:where + len(value)] = value
    (tmp_path / "bad.gguf").write_bytes(bytes(data[:tensor.data_offset + cut] if cut is not None else data))
    return tmp_path / "bad.gguf"


@pytest.mark.parametrize("case,at,value,expected", [
    ("Inf d", 144 * 3, b"\x00\x7c", "non-finite"),
    ("NaN dmin", 144 * 5 + 2, b"\x00\x7e", "non-finite"),
    ("-Inf d", 0, b"\x00\xfc", "non-finite"),
])
def test_k_quant_blocks_with_non_finite_scales_are_refused(case, at, value, expected, wide, tmp_path, cli_runner):
    bad = _patched(wide["base"], tmp_path, "blk.0.attn_q.weight", at, value)
    result = cli_runner("merge", bad, wide["lora"], tmp_path / "out.gguf")
    _one_line_refusal(result, tmp_path, expected, "bad.gguf", "q_proj")


def test_truncated_k_quant_blocks_are_refused(wide, tmp_path, cli_runner):
    """The file ends 100 bytes before its last Q4_K tensor's blocks do."""
    tensors = gguf.GGUFReader(wide["base"]).tensors
    last = max((t for t in tensors if t.tensor_type == Q.Q4_K), key=lambda t: t.data_offset)
    bad = _patched(wide["base"], tmp_path, last.name, 0, b"", cut=int(last.n_bytes) - 100)
    result = cli_runner("merge", bad, wide["lora"], tmp_path / "out.gguf")
    _one_line_refusal(result, tmp_path, "not a readable GGUF file", "(Q4_K, 18432 bytes) ends 100 bytes past the end",
                      "bad.gguf", last.name)


def _one_line_refusal(result, tmp_path, *expected):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    assert not (tmp_path / "out.gguf").exists()


# --- slow: ggml itself ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ggml():
    """ggml-quants.c compiled alone, and llama.cpp's own libggml-base.so where the full fixture was built."""
    sys.path.insert(0, str(FIXTURES))
    import ggml_quants
    import llamacpp

    built = sorted(llamacpp.VENV.glob("lib/python*/site-packages/**/libggml-base.so"))
    return [ctypes.CDLL(str(path)) for path in [ggml_quants.library(), *built[:1]]]


def reference(lib, values: np.ndarray, qtype: Q) -> np.ndarray:
    """ggml's ``quantize_row_<type>_ref`` on ``values`` (whole super-blocks), as rows of blocks."""
    function = getattr(lib, f"quantize_row_{qtype.name[:2].lower()}_K_ref")
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    flat = np.ascontiguousarray(values, np.float32).reshape(-1)
    out = np.zeros(flat.size // 256 * size, np.uint8)
    function(flat.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(flat.size))
    return out.reshape(-1, size)


@pytest.mark.slow
@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_bytes_equal_ggmls_reference_quantizer(qtype, ggml):
    rng = np.random.default_rng(11)
    scales = np.float32(10.0) ** rng.uniform(-8, 4, (512, 1)).astype(np.float32)
    many = (rng.standard_normal((512, 256)) * scales).astype(np.float32)
    many[::3] += rng.standard_normal((171, 256)).astype(np.float32)  # offsets: the asymmetric types' mins
    many[::5, ::11] *= 50
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    encoders = {"numpy": lambda values: kquants.quantize(values, qtype.name)}
    if qtype in native.TYPES and native.LIB is not None:  # the C port too (plugins/gguf/csrc/gguf_kquants.c)
        encoders["native"] = lambda values: native.encode(values, qtype)
    for lib in ggml:
        for values in (hard_rows(), many, normal_rows(seed=3).reshape(-1, 256), varied_rows()):
            want = reference(lib, values, qtype)
            for name, encoder in encoders.items():
                ours = encoder(values).reshape(-1, size)
                bad = np.nonzero((ours != want).any(axis=1))[0]
                assert not len(bad), f"{lib} ({name}): {len(bad)} of {len(want)} differ, first {bad[:8].tolist()}"
        digest = hashlib.sha256(reference(lib, hard_rows(), qtype).tobytes()).hexdigest()
        assert digest == DIGESTS[qtype.name], f'"{qtype.name}": "{digest}",'


def varied_rows(n: int = 200, seed: int = 123) -> np.ndarray:
    """Heavy tails, uniform, all-positive, values on small grids (ties), sparse rows, magnitudes from 1e-30
    to 1e30 (overflowing float32 in the searches) and Laplace noise."""
    rng = np.random.default_rng(seed)
    sparse = rng.standard_normal((n, 256))
    sparse[rng.random((n, 256)) < 0.9] = 0
    parts = [rng.standard_t(2, (n, 256)), rng.uniform(-1, 1, (n, 256)), rng.uniform(0, 1, (n, 256)) + 3,
             rng.integers(-8, 8, (n, 256)) / 2, rng.integers(-3, 4, (n, 256)) * 0.125,
             np.round(rng.standard_normal((n, 256)) * 8) / 8, sparse,
             rng.standard_normal((n, 256)) * 10.0 ** rng.uniform(-30, 30, (n, 1)), rng.laplace(0, 1, (n, 256)) * 1e-3]
    return np.concatenate(parts).astype(np.float32)
