"""The native GGUF codecs split a tensor's blocks over threads (plugins/gguf/native.py, docs/gguf.md,
"Threads"): whatever the split, the bytes and values are those of one thread, bit for bit. Odd row counts
and more threads than blocks make the ranges end mid-row and leave threads with one block or none; the
one-thread results are themselves checked against gguf-py and ggml in tests/test_gguf_native.py and
tests/test_gguf_kquants.py."""

from __future__ import annotations

import ctypes

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from adaptools_plugins.gguf import native

pytestmark = pytest.mark.skipif(native.LIB is None, reason="the GGUF kernel is not built (no C compiler at install)")

TYPES = sorted(native.TYPES, key=lambda q: q.name)


def odd_rows(qtype: Q, rows: int, seed: int) -> np.ndarray:
    """``rows`` rows of three blocks of ``qtype``: Gaussian weights, with outliers, a zero row, a constant
    row, ties and values far below and above float16's range mixed in, so that every thread meets blocks
    that take different branches of the encoder."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal((rows, 3 * block)) * 0.02).astype(np.float32)
    values[1] = 0.0
    values[2] = 7.0
    values[3, :] = np.arange(3 * block, dtype=np.float32) - 1.5 * block
    values[4, ::5] = 1e4
    values[5] *= 1e-40
    values[6] *= 1e6
    return values


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("rows", [7, 13])
def test_threaded_encoding_is_the_one_thread_bytes(qtype, rows):
    values = odd_rows(qtype, rows, seed=rows)
    one = native.encode(values, qtype, threads=1)
    assert one.shape == (rows, 3 * gguf.GGML_QUANT_SIZES[qtype][1])
    for threads in (2, 3, 5, 4 * rows):  # 4 * rows: more threads than blocks (each gets one)
        assert np.array_equal(native.encode(values, qtype, threads=threads), one), threads
    assert np.array_equal(native.encode(values, qtype), one)  # the default split


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_threaded_decoding_is_the_one_thread_values(qtype):
    """Encoded blocks and random bytes (NaN and infinite scales among them): the same float32 bits, NaN
    payloads included."""
    rows = 11
    encoded = native.encode(odd_rows(qtype, rows, seed=1), qtype, threads=1).reshape(-1)
    noise = np.random.default_rng(2).integers(0, 256, size=encoded.size, dtype=np.uint8)
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    noise[5 * size:6 * size] = 0xFF  # every float16 scale in the block NaN
    data = np.concatenate([encoded, noise])
    shape = (2 * rows, 3 * gguf.GGML_QUANT_SIZES[qtype][0])
    one = native.decode(data, qtype, shape, threads=1)
    assert one.shape == shape
    nan_block = encoded.size // size + 5
    assert np.isnan(one.reshape(-1)[nan_block * gguf.GGML_QUANT_SIZES[qtype][0]])  # NaN, mid-tensor
    for threads in (2, 3, 7, 6 * rows):
        assert np.array_equal(native.decode(data, qtype, shape, threads=threads).view(np.uint32),
                              one.view(np.uint32)), threads


def test_the_kernel_releases_the_gil():
    """Threads only help if the C calls let go of the GIL: ctypes' ``CDLL`` does, ``PyDLL`` does not."""
    assert isinstance(native.LIB, ctypes.CDLL) and not isinstance(native.LIB, ctypes.PyDLL)
