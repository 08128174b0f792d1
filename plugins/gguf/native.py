"""The GGUF kernel library (csrc/gguf_kernels.c, gguf_legacy.c, gguf_kquants*.c, gguf_iq4.c): block codecs in C with
the bytes and values of the Python code they replace (gguf-py's numpy for Q8_0, Q4_0/1, Q5_0/1 and every decoder,
kquants.py for the K-quant encoders, iq4.py for IQ4_NL and IQ4_XS), measured at several to tens of times its speed
(docs/gguf.md, "The native codec"): (de)quantizing spent most of a GGUF merge's time.
``ADAPTOOLS_GGUF_PURE_PYTHON=1`` turns it off; without it (no C compiler at install) codec.py uses the Python code,
which gives the same bytes.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as Q

from adaptools import plugin

#: The library's interface version (``adaptools_gguf_abi``).
ABI = 6
#: Each native type: (values per block, bytes per block, the name in its C functions
#: ``adaptools_<name>_encode`` / ``adaptools_<name>_decode``).
BLOCKS: dict[Q, tuple[int, int, str]] = {
    Q.Q8_0: (32, 34, "q8_0"),
    Q.Q4_0: (32, 18, "q4_0"),
    Q.Q4_1: (32, 20, "q4_1"),
    Q.Q5_0: (32, 22, "q5_0"),
    Q.Q5_1: (32, 24, "q5_1"),
    Q.Q2_K: (256, 84, "q2_k"),
    Q.Q3_K: (256, 110, "q3_k"),
    Q.Q4_K: (256, 144, "q4_k"),
    Q.Q5_K: (256, 176, "q5_k"),
    Q.Q6_K: (256, 210, "q6_k"),
    Q.IQ4_NL: (32, 18, "iq4_nl"),
    Q.IQ4_XS: (256, 136, "iq4_xs"),
}
#: The types this library encodes and decodes.
TYPES = frozenset(BLOCKS)
#: The types it also encodes with importance weights (csrc/gguf_imatrix.c; ggml's Q8_0 takes none).
WEIGHTED = frozenset(BLOCKS) - {Q.Q8_0}


def _load(here: Path | None = None) -> Any:
    """The kernel library through ``ctypes.CDLL``, whose calls release the GIL: that is what lets
    ``plugin.split`` run the blocks on several cores at once (a ``PyDLL`` would hold it)."""
    lib = plugin.load_kernel(here or Path(__file__).resolve().parent, "_gguf_kernels", "adaptools_gguf", ABI)
    if lib is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.adaptools_gguf_isa.restype = ctypes.c_int
    for _, _, name in BLOCKS.values():
        for verb in ("encode", "decode"):
            function = getattr(lib, f"adaptools_{name}_{verb}")
            function.argtypes = [ptr, i64, i64, ptr]
            function.restype = None
    lib.adaptools_q8_0_encode_decoded.argtypes = [ptr, i64, i64, ptr, ptr]
    lib.adaptools_q8_0_encode_decoded.restype = None
    for qtype in WEIGHTED:
        function = getattr(lib, f"adaptools_{BLOCKS[qtype][2]}_encode_weighted")
        function.argtypes = [ptr, i64, i64, i64, ptr, i64, ptr]
        function.restype = None
    return lib


LIB = None if os.environ.get("ADAPTOOLS_GGUF_PURE_PYTHON") else _load()


def describe() -> str:
    if LIB is None:
        return "gguf-py (no native kernel; reinstall with a C compiler for faster Q8_0 and K-quants)"
    isa = "avx2" if LIB.adaptools_gguf_isa() == 2 else "baseline"
    return f"native kernel ({isa}) for {', '.join(q.name for q in BLOCKS)}; numpy for the other types"


def encode(values: np.ndarray, qtype: Q, threads: int | None = None) -> np.ndarray:
    """float32 values, the last dimension whole blocks of ``qtype`` -> uint8 ``[..., blocks * block bytes]``:
    gguf-py's ``quants.quantize`` bytes for Q8_0, ggml's quantizer's for K-quants (kquants.py) and IQ4 (iq4.py).

    The blocks are split over ``threads`` (default: ``plugin.split``'s, every core up to four); each block is
    coded on its own, so the bytes do not depend on the split (docs/gguf.md, "Threads")."""
    assert LIB is not None
    n, size, name = BLOCKS[qtype]
    values = np.ascontiguousarray(values, dtype=np.float32)
    blocks = values.size // n
    out = np.empty(blocks * size, dtype=np.uint8)
    function = getattr(LIB, f"adaptools_{name}_encode")
    plugin.split(blocks, lambda b0, b1: function(values.ctypes.data, b0, b1, out.ctypes.data), threads)
    return out.reshape(*values.shape[:-1], values.shape[-1] // n * size)


#: Blocks encoded, then decoded again, at a time in :func:`encode_decoded` for the types without a fused kernel:
#: a piece's values (128 KiB of float32 for 32-value blocks) are still in the core's cache when they are decoded.
PIECE_BLOCKS = 1024


def encode_decoded(values: np.ndarray, qtype: Q, back: np.ndarray | None = None,
                   threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`encode`'s bytes and :func:`decode` of them (into ``back``, float32 of ``values``' size, when
    given), in one pass: the merge decodes everything it encodes, and a second pass over the tensor cost as
    much as the encoding (docs/gguf.md, "Where a merge's time goes"). Q8_0 in one fused kernel, the other types
    a piece of blocks at a time, each piece decoded while its codes are in cache. The same bytes and values as
    the two calls: each block is coded on its own."""
    assert LIB is not None
    n, size, name = BLOCKS[qtype]
    values = np.ascontiguousarray(values, dtype=np.float32)
    blocks = values.size // n
    out = np.empty(blocks * size, dtype=np.uint8)
    if back is None:
        back = np.empty(blocks * n, dtype=np.float32)
    assert back.dtype == np.float32 and back.size == blocks * n and back.flags.c_contiguous
    src, dst, again = values.ctypes.data, out.ctypes.data, back.ctypes.data
    if qtype == Q.Q8_0:
        fused = LIB.adaptools_q8_0_encode_decoded
        plugin.split(blocks, lambda b0, b1: fused(src, b0, b1, dst, again), threads)
    else:
        enc, dec = getattr(LIB, f"adaptools_{name}_encode"), getattr(LIB, f"adaptools_{name}_decode")

        def work(b0: int, b1: int) -> None:
            for p0 in range(b0, b1, PIECE_BLOCKS):
                p1 = min(p0 + PIECE_BLOCKS, b1)
                enc(src, p0, p1, dst)
                dec(dst, p0, p1, again)

        plugin.split(blocks, work, threads)
    return out.reshape(*values.shape[:-1], values.shape[-1] // n * size), back.reshape(values.shape)


def decode(data: np.ndarray, qtype: Q, shape: tuple[int, ...], threads: int | None = None,
           out: np.ndarray | None = None) -> np.ndarray:
    """``qtype`` bytes -> float32 values in numpy ``shape``, as gguf-py's ``quants.dequantize`` (into ``out``,
    contiguous float32 of that size, when given: the merge lends a pooled buffer); the blocks split over
    ``threads`` as in :func:`encode`."""
    assert LIB is not None
    n, size, name = BLOCKS[qtype]
    data = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
    blocks = data.size // size
    if out is None:
        out = np.empty(blocks * n, dtype=np.float32)
    assert out.dtype == np.float32 and out.size == blocks * n and out.flags.c_contiguous
    function = getattr(LIB, f"adaptools_{name}_decode")
    plugin.split(blocks, lambda b0, b1: function(data.ctypes.data, b0, b1, out.ctypes.data), threads)
    return out.reshape(shape)


def encode_weighted(values: np.ndarray, qtype: Q, weights: np.ndarray) -> np.ndarray:
    """float32 values ``[..., rows, n]`` -> ``qtype`` bytes as ggml's quantizer makes them when given
    importance ``weights`` (docs/gguf.md, "Importance matrices"): ``[n]`` for every row, or ``[experts, n]``
    for a tensor of stacked experts (``values.shape[0] == experts``), one vector per expert."""
    assert LIB is not None
    n, size, name = BLOCKS[qtype]
    values = np.ascontiguousarray(values, dtype=np.float32)
    cols = values.shape[-1]
    weights = np.ascontiguousarray(weights, dtype=np.float32).reshape(-1, cols)
    rows = values.size // cols
    if cols % n or rows % weights.shape[0]:
        raise ValueError(f"{qtype.name} importance weights {list(weights.shape)} do not fit rows {list(values.shape)}")
    per_weight = rows // weights.shape[0]
    out = np.empty(rows * (cols // n) * size, dtype=np.uint8)
    function = getattr(LIB, f"adaptools_{name}_encode_weighted")
    plugin.split(rows, lambda r0, r1: function(values.ctypes.data, r0, r1, cols, weights.ctypes.data, per_weight,
                                               out.ctypes.data))
    return out.reshape(*values.shape[:-1], cols // n * size)
