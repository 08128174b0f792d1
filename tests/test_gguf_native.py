"""The native codecs (plugins/gguf/csrc/) against the Python code they replace, byte for byte and value for
value. Q8_0 against gguf-py's numpy code: ties, zero blocks, scales that overflow or underflow float16, long
and short rows; Q4_0, Q4_1, Q5_0 and Q5_1 against it too, NaN and infinite values included. The K-quants
against kquants.py (whose bytes are ggml's; tests/test_gguf_kquants.py checks the native ones against ggml
itself too) on the rows that reach every branch of the searches, and their decoding against gguf-py's on
those blocks and on random bytes (NaN and Inf scales included)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from adaptools_plugins.gguf import codec, kquants, native

pytestmark = pytest.mark.skipif(native.LIB is None, reason="the GGUF kernel is not built (no C compiler at install)")


def hostile_rows() -> np.ndarray:
    """Rows of 32-value blocks that probe every branch of the encoder."""
    rng = np.random.default_rng(23)
    blocks = [rng.standard_normal((64, 32)).astype(np.float32) * 0.02]
    blocks.append(np.zeros((1, 32), np.float32))  # d = 0: id = 0, every code 0
    ties = np.arange(-15.5, 16.0, dtype=np.float32)  # amax 127 gives d = 1 and id = 1: every x · id is a tie
    ties[0] = 127.0
    blocks.append(ties[None])
    blocks.append(-ties[None])
    blocks.append(np.full((1, 32), -0.0, np.float32))
    for scale in (1e-38, 1e-45, 6e-8, 1.0, 65504.0 * 127, 3e38):  # subnormal d, float16 underflow and overflow
        blocks.append((rng.standard_normal((2, 32)) * scale).astype(np.float32))
    outliers = rng.standard_normal((4, 32)).astype(np.float32)
    outliers[:, 7] = 1e4
    blocks.append(outliers)
    return np.concatenate(blocks)


def gguf_py(monkeypatch, fn, *args):
    with monkeypatch.context() as python_only:
        python_only.setattr(native, "LIB", None)
        return fn(*args)


@pytest.mark.parametrize("row_blocks", [1, 3, 64])
def test_q8_0_encoding_is_gguf_pys_byte_for_byte(row_blocks, monkeypatch):
    values = hostile_rows()
    n = values.shape[0] // row_blocks * row_blocks
    rows = values[:n].reshape(-1, row_blocks * 32)
    ours = codec.encode(rows, Q.Q8_0)
    theirs = gguf_py(monkeypatch, codec.encode, rows, Q.Q8_0)
    assert ours.dtype == theirs.dtype == np.uint8 and ours.shape == theirs.shape
    assert np.array_equal(ours, theirs)
    assert np.array_equal(ours, gguf.quants.quantize(rows, Q.Q8_0))  # and gguf-py called directly


def test_q8_0_decoding_is_gguf_pys_value_for_value(monkeypatch):
    values = hostile_rows()
    rows = values[: values.shape[0] // 4 * 4].reshape(-1, 4 * 32)
    data = gguf.quants.quantize(rows, Q.Q8_0)
    rng = np.random.default_rng(5)
    noise = rng.integers(0, 256, size=(16, data.shape[1]), dtype=np.uint8)  # any bytes, NaN and Inf scales too
    data = np.concatenate([data, noise])
    ours = codec.decode_bytes(data, Q.Q8_0, (data.shape[0], rows.shape[1]))
    with np.errstate(all="ignore"):
        theirs = gguf_py(monkeypatch, codec.decode_bytes, data, Q.Q8_0, (data.shape[0], rows.shape[1]))
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))  # NaNs compared by their bits


def test_a_row_that_is_not_whole_blocks_still_goes_to_gguf_py():
    with pytest.raises(gguf.QuantError):
        codec.encode(np.ones((2, 48), np.float32), Q.Q8_0)


# --- K-quants ----------------------------------------------------------------------------------------------

KQUANTS = sorted(native.TYPES & codec.KQUANTS, key=lambda q: q.name)


def kquant_rows() -> np.ndarray:
    """The byte-identity rows of tests/test_gguf_kquants.py: every branch, ties, zeros, subnormals, +-65504,
    +-FLT_MAX, and many distributions and magnitudes."""
    from test_gguf_kquants import hard_rows, normal_rows, varied_rows

    return np.concatenate([hard_rows(), normal_rows(seed=3).reshape(-1, 256), varied_rows(n=40)])


@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda q: q.name)
def test_k_quant_encoding_is_the_numpy_encoders_byte_for_byte(qtype, monkeypatch):
    values = kquant_rows()
    # one block a row, many, a single block, an odd count split over the threads
    for rows in (values, values[:48].reshape(2, -1), values[:1], values[:5]):
        ours = codec.encode(rows, qtype)
        theirs = gguf_py(monkeypatch, codec.encode, rows, qtype)
        assert ours.dtype == theirs.dtype == np.uint8 and ours.shape == theirs.shape
        bad = np.nonzero((ours.reshape(-1, native.BLOCKS[qtype][1]) != theirs.reshape(-1, native.BLOCKS[qtype][1]))
                         .any(axis=1))[0]
        assert not len(bad), f"{len(bad)} blocks differ, first {bad[:8].tolist()}"
    assert np.array_equal(codec.encode(values, qtype), kquants.quantize(values, qtype.name))


@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda q: q.name)
def test_k_quant_decoding_is_gguf_pys_value_for_value(qtype, monkeypatch):
    data = kquants.quantize(kquant_rows(), qtype.name)
    rng = np.random.default_rng(9)
    noise = rng.integers(0, 256, size=(64, data.shape[1]), dtype=np.uint8)  # any bytes, NaN and Inf scales too
    data = np.concatenate([data, noise]).reshape(-1, 4 * data.shape[1])  # rows of 4 blocks
    shape = (data.shape[0], 4 * 256)
    ours = codec.decode_bytes(data, qtype, shape)
    with np.errstate(all="ignore"):
        theirs = gguf_py(monkeypatch, codec.decode_bytes, data, qtype, shape)
        direct = gguf.quants.dequantize(data, qtype)
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))  # NaNs compared by their bits
    assert np.array_equal(ours.view(np.uint32), direct.view(np.uint32))
    assert not np.isfinite(ours).all()  # the random bytes did reach non-finite scales


def test_plugins_names_the_native_types():
    """``adaptools plugins`` says which types run in C (tests/test_packaging.py checks the fallback's line)."""
    assert native.describe().startswith("native kernel (")
    assert native.describe().endswith(f"for {', '.join(q.name for q in native.BLOCKS)}; numpy for the other types")
    assert {Q.Q8_0, Q.Q4_K, Q.Q6_K} <= native.TYPES


# --- Q4_0, Q4_1, Q5_0, Q5_1 ------------------------------------------------------------------------------------

LEGACY = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]


def legacy_rows() -> np.ndarray:
    """:func:`hostile_rows`, and blocks with NaN and infinities (gguf-py's max, min and argmax propagate NaN,
    its float -> uint8 cast turns NaN and out-of-range codes into 0), +-3.4e38 (a range that overflows),
    ties, signed zeros, subnormals below float16 and constant blocks."""
    rng = np.random.default_rng(3)
    nan = rng.standard_normal((3, 32)).astype(np.float32)
    nan[0, 3], nan[1, 0], nan[2, 31] = np.nan, -np.nan, np.nan
    inf = rng.standard_normal((3, 32)).astype(np.float32)
    inf[0, 3], inf[1, 0], inf[2, :2] = np.inf, -np.inf, (np.inf, -np.inf)
    huge = rng.standard_normal((2, 32)).astype(np.float32)
    huge[0, 1], huge[0, 2], huge[1, 5] = 3.4e38, -3.4e38, 3.4e38
    ties = np.tile(np.arange(32, dtype=np.float32) - 16, (2, 1))
    ties[1] *= -1
    with np.errstate(over="ignore"):
        blocks = [hostile_rows(), nan, inf, huge, ties, np.full((1, 32), -0.0, np.float32),
                  (rng.standard_normal((2, 32)) * 1e-44).astype(np.float32), np.full((1, 32), 7.0, np.float32)]
    return np.concatenate(blocks)


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda q: q.name)
def test_legacy_types_encode_as_gguf_py_byte_for_byte(qtype, monkeypatch):
    assert qtype in native.TYPES
    values = legacy_rows()
    rows = values[: values.shape[0] // 4 * 4].reshape(-1, 4 * 32)
    ours = codec.encode(rows, qtype)
    with np.errstate(all="ignore"):
        theirs = gguf_py(monkeypatch, codec.encode, rows, qtype)
        direct = gguf.quants.quantize(values, qtype)
    assert ours.dtype == theirs.dtype == np.uint8 and ours.shape == theirs.shape
    assert np.array_equal(ours, theirs)
    assert np.array_equal(native.encode(values, qtype), direct)  # one block a row


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda q: q.name)
def test_legacy_types_decode_as_gguf_py_value_for_value(qtype, monkeypatch):
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    with np.errstate(all="ignore"):
        data = gguf.quants.quantize(legacy_rows(), qtype).reshape(-1)
    noise = np.random.default_rng(1).integers(0, 256, size=64 * size, dtype=np.uint8)  # NaN and Inf scales too
    data = np.concatenate([data, noise])
    data = data[: data.size // (2 * size) * 2 * size].reshape(-1, 2 * size)
    shape = (data.shape[0], 64)
    ours = codec.decode_bytes(data, qtype, shape)
    with np.errstate(all="ignore"):
        theirs = gguf_py(monkeypatch, codec.decode_bytes, data, qtype, shape)
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))
    assert not np.isfinite(ours).all()


# --- encoded and decoded in one pass (native.encode_decoded, the merge's re-encoding) ------------------------


def _hostile_for(qtype: Q) -> np.ndarray:
    # super-blocks of 256 (the K-quants, IQ4_XS) take the K-quant rows, whose hostile blocks are whole super-blocks
    values = kquant_rows() if native.BLOCKS[qtype][0] == 256 else legacy_rows()
    n = native.BLOCKS[qtype][0]
    return values.reshape(-1)[: values.size // (4 * n) * 4 * n].reshape(-1, 4 * n)  # rows of 4 blocks


@pytest.mark.parametrize("qtype", sorted(native.TYPES, key=lambda q: q.name), ids=lambda q: q.name)
@pytest.mark.parametrize("threads", [1, 3])
def test_encoded_and_decoded_in_one_pass_are_gguf_pys_bytes_and_values(qtype, threads, monkeypatch):
    """The fused pass (Q8_0's own kernel, the other types a piece of blocks at a time) gives the bytes gguf-py
    (kquants.py for the K-quants) encodes and the values gguf-py decodes from them, bit for bit, NaN,
    infinities and float16-overflowing scales included; into a lent buffer too, and over more blocks than a
    piece (native.PIECE_BLOCKS) so that pieces and threads split them."""
    rows = _hostile_for(qtype)
    with np.errstate(all="ignore"):
        want = gguf_py(monkeypatch, codec.encode, rows, qtype)
        back = gguf.quants.dequantize(want, qtype)
    many = np.concatenate([rows] * (2 * native.PIECE_BLOCKS // rows.shape[0] + 1))
    with np.errstate(all="ignore"):
        many_want = gguf_py(monkeypatch, codec.encode, many, qtype)
        many_back = gguf.quants.dequantize(many_want, qtype)
    for values, data, decoded in ((rows, want, back), (many, many_want, many_back)):
        lent = np.full(values.size, 7.0, np.float32)
        for buffer in (None, lent):
            got, got_back = native.encode_decoded(values, qtype, buffer, threads=threads)
            assert got.shape == data.shape and np.array_equal(got, data)
            assert got_back.shape == values.shape
            assert np.array_equal(got_back.view(np.uint32), decoded.view(np.uint32))  # NaNs by their bits
        assert np.shares_memory(native.encode_decoded(values, qtype, lent)[1], lent)
    assert not np.isfinite(back).all()  # the hostile rows did write non-finite values
