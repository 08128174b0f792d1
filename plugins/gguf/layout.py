"""One tensor of a GGUF model file between the merge engine and the file: how a stored tensor decodes to the
Hugging Face value a LoRA merges into, and how a changed value is encoded back.

The backend (decoding a GGUF base), the container (writing one GGUF file) and the dense export (a Hugging Face
base written as GGUF) all encode through these functions, so they live here and not on the backend class:
each of the three imports this module, and none of them has to reach the others for it.

A tensor's *settings* (:func:`settings_for`) are self-contained and JSON-able: its GGUF name, numpy shape and
type, and the layout facts (architecture, head counts) that put a Hugging Face value into GGUF's layout
(docs/gguf.md, "Merging into a GGUF base").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from . import native
from .arch import ModelShape, family_for_arch, from_gguf_layout, qk_heads, to_gguf_layout
from .codec import decode_bytes, encode
from .fields import Header
from .imatrix import load as load_imatrix

#: torch dtypes of the float GGUF types as :func:`as_torch` hands them over.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a GGUF base: its GGUF name, type, numpy shape (GGUF layout) and bytes in the file."""

    gguf_name: str
    qtype: Q
    shape: tuple[int, ...]
    begin: int
    nbytes: int
    file: Path | None = None  # the part of a split model holding it (None: the base's one file)


@dataclass(frozen=True)
class GGUFBase:
    """A GGUF model file opened as a merge base: its architecture, its tensors by Hugging Face parameter
    (by GGUF name where they have none), and its header (the container copies its metadata)."""

    path: Path
    model: ModelShape
    stored: dict[str, StoredTensor]
    reader: Header

    def hf_shape(self, param: str) -> tuple[int, ...]:
        """The dense shape the merge sees: the stored numpy shape, transposed for Conv1D block weights."""
        stored = self.stored[param]
        transposed = self.model.family.conv1d and len(stored.shape) == 2 and stored.gguf_name.startswith("blk.")
        return tuple(reversed(stored.shape)) if transposed else stored.shape

    def decode(self, param: str, value: torch.Tensor, settings: Mapping[str, Any] | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """``value`` (the stored bytes of ``param``, or what :func:`encode_value` made with ``settings``) as
        float32 in the Hugging Face layout; into ``out`` (float32, contiguous, of that size) where the native
        kernel decodes the type and the layouts agree, else in a new tensor."""
        if settings is not None:
            return decode_encoded(settings, value, self.path)
        stored = self.stored[param]
        values = torch.from_numpy(decode_value(value, stored.qtype, stored.shape, out))
        return from_gguf_layout(self.model, stored.gguf_name, values, self.path)


def settings_for(model: ModelShape, gguf_name: str, shape: Sequence[int], qtype: Q) -> dict[str, Any]:
    """The settings of a tensor written as ``gguf_name`` in ``qtype`` (JSON-able, self-contained)."""
    heads = qk_heads(model, gguf_name)
    return {"name": gguf_name, "shape": list(shape), "type": int(qtype), "arch": model.family.arch,
            "n_head": heads[0] if heads else None, "n_head_kv": heads[1] if heads else None}


def encode_value(settings: Mapping[str, Any], dense: torch.Tensor, path: object = None) -> torch.Tensor:
    """A Hugging Face value -> the tensor the writer stores for it, as ``settings`` say (see :func:`as_torch`)."""
    model = ModelShape(family_for_arch(settings["arch"]), n_head=settings["n_head"], n_head_kv=settings["n_head_kv"])
    value = to_gguf_layout(model, settings["name"], dense.float(), path)
    qtype = Q(settings["type"])
    weights = None
    if settings.get("imatrix"):  # --imatrix: llama-quantize's weighting (docs/gguf.md, "Importance matrices")
        weights = load_imatrix(settings["imatrix"]).for_tensor(settings["name"], tuple(settings["shape"]))
    return as_torch(encode(value.numpy(), qtype, weights), qtype, settings["shape"])


def encode_value_decoded(settings: Mapping[str, Any], dense: torch.Tensor, path: object = None,
                         out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`encode_value` and :func:`decode_encoded` of what it made, in one pass of the native kernel where it
    encodes the type without importance weights (native.encode_decoded: the same bytes and values), else the
    two calls. The decoded values go into ``out`` (float32, the dense value's size) when given and the layouts
    agree; Q/K rows, put back in Hugging Face order, and Conv1D weights come out in a new tensor."""
    qtype = Q(settings["type"])
    block = GGML_QUANT_SIZES[qtype][0]
    if settings.get("imatrix") or qtype not in native.TYPES or native.LIB is None or not settings["shape"] \
            or settings["shape"][-1] % block:
        encoded = encode_value(settings, dense, path)
        return encoded, decode_encoded(settings, encoded, path)
    model = ModelShape(family_for_arch(settings["arch"]), n_head=settings["n_head"], n_head_kv=settings["n_head_kv"])
    value = to_gguf_layout(model, settings["name"], dense.float(), path)
    back = None
    if out is not None and out.dtype == torch.float32 and out.is_contiguous() and out.numel() == value.numel():
        back = out.numpy().reshape(-1)
    data, decoded = native.encode_decoded(value.numpy(), qtype, back)
    values = torch.from_numpy(decoded.reshape(tuple(settings["shape"])))
    return as_torch(data, qtype, settings["shape"]), from_gguf_layout(model, settings["name"], values, path)


def decode_encoded(settings: Mapping[str, Any], value: torch.Tensor, path: object = None) -> torch.Tensor:
    """What :func:`encode_value` made with ``settings``, decoded again into the Hugging Face layout as
    float32: the settings hold all it needs, so a value encoded for a new file (a dense base written as GGUF)
    decodes without one."""
    model = ModelShape(family_for_arch(settings["arch"]), n_head=settings["n_head"], n_head_kv=settings["n_head_kv"])
    values = torch.from_numpy(decode_value(value, Q(settings["type"]), tuple(settings["shape"])))
    return from_gguf_layout(model, settings["name"], values, path)


def as_torch(array: np.ndarray, qtype: Q, shape: Sequence[int]) -> torch.Tensor:
    """What gguf-py encoded, as the tensor the writer stores: float types as their torch dtype (so that
    a reader can tell them apart), block-quantized bytes as flat uint8."""
    if qtype == Q.F32:
        return torch.from_numpy(np.array(array, dtype=np.float32).reshape(tuple(shape)))
    if qtype == Q.F16:
        return torch.from_numpy(np.asarray(array, dtype=np.float16).reshape(tuple(shape)))
    flat = torch.from_numpy(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    return flat.view(torch.bfloat16).reshape(tuple(shape)) if qtype == Q.BF16 else flat


def decode_value(value: torch.Tensor, qtype: Q, shape: tuple[int, ...], out: torch.Tensor | None = None) -> np.ndarray:
    """A tensor of ``qtype`` (bytes read from the file, or :func:`as_torch`'s float tensor) -> float32 in
    GGUF's numpy layout; into ``out`` where the native kernel decodes the type (and ``out`` is contiguous
    float32 of that size)."""
    if value.dtype in FLOAT_DTYPES:
        return value.float().numpy().reshape(shape)
    into = None
    if out is not None and out.dtype == torch.float32 and out.is_contiguous() and out.device.type == "cpu" \
            and out.numel() == math.prod(shape):
        into = out.numpy().reshape(-1)
    return decode_bytes(value.reshape(-1).numpy(), qtype, shape, into)
