"""GGUF files through gguf-py: opening one safely, typed metadata, and one tensor to fp32 and back.

gguf-py (llama.cpp's own Python library) does the parsing and the (de)quantization; this module only turns
its failures on a hostile or truncated file into one :class:`plugin.InputError`, checks metadata types the
way llama.cpp checks them, and gives the numpy layout (``ReaderTensor.shape`` is ggml's ``ne``, fastest
dimension first; the arrays here are always in numpy order, docs/gguf.md, "The file").
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from adaptools.plugin import InputError

from . import iq4, kquants, native
from .fields import Header
from .header import check_counts

MAGIC = b"GGUF"
#: K-quants we encode ourselves, with the bytes of ggml's reference quantizer (kquants.py).
KQUANTS = frozenset({Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K})
#: The non-linear 4-bit types we encode ourselves, with the bytes of ggml's quantizer (iq4.py).
IQ4 = frozenset({Q.IQ4_NL, Q.IQ4_XS})
#: Types we can encode: gguf-py's (quantize, in Python), the K-quants (kquants.py) and IQ4_NL/IQ4_XS (iq4.py),
#: each also in the native kernel where it is built (native.TYPES, the same bytes); the others (the 1-3 bit
#: IQ types and a few more) only decode.
ENCODABLE = frozenset({Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1}) | KQUANTS | IQ4
#: ``--outtype`` names of an adapter's tensors.
OUTTYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}


def is_gguf(path: Path) -> bool:
    """True if ``path`` is a file starting with the GGUF magic. Never raises."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == MAGIC
    except OSError:
        return False


def open_reader(path: Path) -> gguf.GGUFReader:
    """A memory-mapped reader, after every count in the header was bounded by the file's size
    (:func:`.header.check_counts`); any parse failure becomes one InputError naming the file."""
    check_counts(path)
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # gguf-py raises ValueError, IndexError, KeyError, ... on hostile bytes
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"not a readable GGUF file ({detail[:200]})", path=path,
                         hint="the file is truncated or corrupt; write it again") from None


_PY_TYPES = {
    str: (gguf.GGUFValueType.STRING,),
    int: (gguf.GGUFValueType.UINT8, gguf.GGUFValueType.INT8, gguf.GGUFValueType.UINT16, gguf.GGUFValueType.INT16,
          gguf.GGUFValueType.UINT32, gguf.GGUFValueType.INT32, gguf.GGUFValueType.UINT64, gguf.GGUFValueType.INT64),
    float: (gguf.GGUFValueType.FLOAT32,),
}


def scalar(reader: gguf.GGUFReader | Header, key: str, kind: type, path: object, *, required: bool = True) -> Any:
    """The value of a scalar key, checked to be of the GGUF type llama.cpp reads it as (float: FLOAT32 only,
    as ``gguf_get_val_f32`` asserts). None when absent and not required."""
    field = reader.get_field(key)
    if field is None:
        if required:
            raise InputError(f"the GGUF metadata has no {key}", path=path)
        return None
    if len(field.types) != 1 or field.types[0] not in _PY_TYPES[kind]:
        got = "/".join(t.name for t in field.types) or "nothing"
        raise InputError(f"GGUF metadata {key} is {got}, not a {_PY_TYPES[kind][0].name.lower()}"
                         f"{' scalar' if kind is not str else ''}", path=path)
    try:
        value = field.contents()
    except Exception:  # bytes that are not UTF-8, and the like
        raise InputError(f"GGUF metadata {key} cannot be decoded", path=path) from None
    if kind is float:
        value = float(value)
        if not math.isfinite(value):
            raise InputError(f"GGUF metadata {key} is {value}", path=path)
    elif kind is int:
        value = int(value)
    return value


def numpy_shape(tensor: Any) -> tuple[int, ...]:
    """A reader tensor's logical shape in numpy order (``ne`` reversed)."""
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def decode(tensor: Any, path: object = None) -> np.ndarray:
    """One GGUF tensor as float32 in numpy order, through gguf-py's ``dequantize`` (every type it decodes,
    K-quants and IQ types included). F32 is returned as a view; copy before changing it."""
    qtype = tensor.tensor_type
    try:
        if qtype == Q.F32:
            values = np.asarray(tensor.data, dtype=np.float32)
        elif qtype == Q.F16:
            values = np.asarray(tensor.data).astype(np.float32)
        else:
            with np.errstate(all="ignore"):  # non-finite scales: the engine names the tensor (finite.py)
                values = gguf.quants.dequantize(np.asarray(tensor.data), qtype)
        return values.reshape(numpy_shape(tensor))
    except NotImplementedError:
        raise InputError(f"gguf-py cannot decode {qtype.name} tensors", path=path, tensor=tensor.name) from None
    except (ValueError, TypeError) as exc:
        raise InputError(f"{qtype.name} data does not fit shape {list(numpy_shape(tensor))} ({exc})", path=path,
                         tensor=tensor.name) from None


def encode(values: np.ndarray, qtype: Q, weights: np.ndarray | None = None) -> np.ndarray:
    """float32 values (numpy order) -> the array gguf-py writes for ``qtype``: float32/float16 arrays, or
    uint8 rows of blocks (BF16 and the block quants). Raises ``gguf.QuantError`` when the last dimension is
    not a whole number of blocks, and KeyError for a type we cannot encode (see :data:`ENCODABLE`).
    ``weights`` (an imatrix entry, ``[experts, columns]``) gives llama-quantize's weighted bytes for the types
    ggml weights (native.WEIGHTED, native kernel only: imatrix.py's callers check); other types ignore them,
    as ggml does (docs/gguf.md, "Importance matrices")."""
    if qtype not in ENCODABLE:
        raise KeyError(qtype)
    values = np.ascontiguousarray(values, dtype=np.float32)
    if weights is not None and qtype in native.WEIGHTED and values.ndim >= 2 \
            and values.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
        if native.LIB is None:
            raise gguf.QuantError("importance-weighted encoding needs the native GGUF kernel")
        return native.encode_weighted(values, qtype, weights)
    if qtype in KQUANTS and (values.ndim == 0 or values.shape[-1] % kquants.QK_K):
        raise gguf.QuantError(f"{qtype.name} needs rows of whole {kquants.QK_K}-value blocks, "
                              f"not {values.shape[-1:] or 'a scalar'}")
    if qtype in native.TYPES and native.LIB is not None and values.ndim \
            and values.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
        return native.encode(values, qtype)  # the same bytes, in C (docs/gguf.md, "The native codec")
    if qtype in KQUANTS:  # ggml's reference bytes, in numpy (docs/gguf.md, "K-quant encoders")
        return kquants.quantize(values, qtype.name)
    if qtype in IQ4:  # ggml's bytes, in numpy (docs/gguf.md, "IQ4 encoders")
        try:
            return iq4.quantize(values, qtype.name)
        except ValueError as exc:
            raise gguf.QuantError(str(exc)) from None
    if qtype == Q.F32:
        return values
    if qtype == Q.F16:
        with np.errstate(over="ignore"):  # overflow to infinity: the engine refuses it naming the tensor
            return values.astype(np.float16)
    if values.ndim < 2 or values.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return gguf.quants.quantize(values, qtype)  # (gguf-py refuses partial blocks itself)
    return gguf.quants.quantize(wide_rows(values), qtype).reshape(*values.shape[:-1], -1)


#: Values per row handed to gguf-py at once (see :func:`wide_rows`).
ROW_VALUES = 1 << 15


def wide_rows(values: np.ndarray) -> np.ndarray:
    """The same values as fewer, longer rows (whole rows joined): gguf-py (de)quantizes a block at a time
    within rows, in Python-level groups of 16 rows, so longer rows mean fewer calls and the same bytes."""
    cols = values.shape[-1]
    rows = values.size // cols
    join = max(1, ROW_VALUES // cols)
    while rows % join:
        join -= 1
    return values.reshape(rows // join, cols * join)


def encode_with_fallback(values: np.ndarray, qtype: Q) -> tuple[np.ndarray, Q]:
    """:func:`encode`, falling back to F16 where the rows are not whole blocks (as llama.cpp's converter)."""
    try:
        return encode(values, qtype), qtype
    except gguf.QuantError:
        return encode(values, Q.F16), Q.F16


# --- raw tensor bytes (a GGUF base's tensors, read without the reader) ---------------------------------------

_DECODABLE: dict[Q, bool] = {}


def decodable(qtype: Q) -> bool:
    """Whether gguf-py decodes ``qtype`` (probed once per type on one block of zeros)."""
    if qtype not in _DECODABLE:
        try:
            _, type_size = gguf.GGML_QUANT_SIZES[qtype]
            gguf.quants.dequantize(np.zeros((1, type_size), np.uint8), qtype)
            _DECODABLE[qtype] = True
        except (NotImplementedError, KeyError):
            _DECODABLE[qtype] = False
    return _DECODABLE[qtype]


def nbytes(qtype: Q, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of ``qtype`` and numpy ``shape`` takes (the last dimension must be whole blocks)."""
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    numel = 1
    for d in shape:
        numel *= d
    return numel // block * type_size


def decode_bytes(data: np.ndarray, qtype: Q, shape: tuple[int, ...], out: np.ndarray | None = None) -> np.ndarray:
    """A tensor's stored bytes (uint8) -> float32 in numpy ``shape``, decoded by the native kernel where it
    covers the type (into ``out``, flat float32 of that size, when given), else by gguf-py a row at a time
    (the same values)."""
    row_bytes = nbytes(qtype, (shape[-1] if shape else 1,))
    if qtype in native.TYPES and native.LIB is not None:
        # gguf-py's values, in C (docs/gguf.md, "The native codec")
        return native.decode(data, qtype, shape, out=out)
    with np.errstate(all="ignore"):  # non-finite scales: the engine names the tensor (finite.py)
        values = gguf.quants.dequantize(wide_rows(np.asarray(data, dtype=np.uint8).reshape(-1, row_bytes)), qtype)
    return np.asarray(values, dtype=np.float32).reshape(shape)


def changed_type(stored: Q, row: int, override: Q | None = None) -> Q:
    """The type a tensor a merge changed is written in: ``override`` (``--outtype``) if given, else its own
    where we encode it (:data:`ENCODABLE`, K-quants and IQ4 included), else Q8_0 (the other IQ types); F16 where
    its rows are not whole blocks of that type (docs/gguf.md, "Tensor types gguf-py encodes and decodes")."""
    want = override if override is not None else stored if stored in ENCODABLE else Q.Q8_0
    return want if row % gguf.GGML_QUANT_SIZES[want][0] == 0 else Q.F16
