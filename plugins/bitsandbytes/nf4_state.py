"""The bitsandbytes 4-bit quant state: the settings and companion tensors a packed NF4/FP4 weight needs,
read from a checkpoint and checked against the packed data before any kernel runs (docs/nf4.md, "The
quant-state blob")."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from adaptools import plugin
from adaptools.plugin import InputError

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
STATE_PREFIX = "quant_state.bitsandbytes__"
#: The dense dtypes a quant state names, by its name for them (``"bfloat16"``).
DTYPE_NAMES = {t.config: t.torch for t in plugin.FLOAT_TYPES}
#: The JSON blob ``quant_state.bitsandbytes__<type>`` as bitsandbytes writes it (docs/input-validation.md).
STATE_SCHEMA = {
    "type": "object",
    "required": ["quant_type", "blocksize", "dtype", "shape"],
    "properties": {
        "quant_type": {"enum": ["nf4", "fp4"]},
        "blocksize": {"type": "integer", "enum": list(BLOCKSIZES)},
        "dtype": {"enum": list(DTYPE_NAMES)},
        "shape": {"type": "array", "maxItems": 8, "items": {"type": "integer", "minimum": 0, "maximum": 2**40},
                  "description": "a list of dimensions"},
        "nested_blocksize": {"type": "integer", "enum": [NESTED_BLOCKSIZE]},
        "nested_dtype": {"enum": ["float32"]},
        "nested_offset": {"type": "number"},
    },
}
#: A quant-state blob is a few hundred bytes.
MAX_STATE_BYTES = 64 * 1024
MAX_ELEMENTS = 2**40


def parse_state(blob: torch.Tensor, name: str, path: object = None) -> dict[str, Any]:
    """The validated JSON of a quant-state blob tensor (U8 bytes), or InputError naming it."""
    if blob.dtype != torch.uint8 or blob.dim() != 1 or blob.numel() > MAX_STATE_BYTES:
        raise InputError(f"the 4-bit quant state must be at most {MAX_STATE_BYTES} bytes of U8, got "
                         f"{str(blob.dtype).removeprefix('torch.')} {list(blob.shape)}", path=path, tensor=name)
    hint = "the 4-bit checkpoint is corrupt; quantize it again"
    try:
        data = plugin.parse_json(blob.numpy().tobytes(), path=path, what="4-bit quant state", max_depth=3,
                                    hint=hint)
        plugin.check_json(data, STATE_SCHEMA, path=path, what="4-bit quant state", hint=hint)
    except InputError as exc:
        raise InputError(exc.message, path=path, tensor=name, hint=hint) from None
    if math.prod(data["shape"]) > MAX_ELEMENTS:
        raise InputError(f"4-bit quant state shape {data['shape']} is too large", path=path, tensor=name, hint=hint)
    return data  # type: ignore[no-any-return]


@dataclass
class QuantState:
    """What a 4-bit tensor needs besides its packed bytes (bitsandbytes' QuantState, as stored)."""

    quant_type: str
    blocksize: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    absmax: torch.Tensor  # F32 [nb], or U8 [nb] codes under double quantization
    quant_map: torch.Tensor
    nested_absmax: torch.Tensor | None = None
    nested_quant_map: torch.Tensor | None = None
    nested_offset: float | None = None

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def absmax_f32(self) -> torch.Tensor:
        """Per-block scale in fp32: dyn[q] * nested_absmax, then + offset, each rounded (docs/nf4.md, "Decoding")."""
        if not self.double_quant:
            return self.absmax.float()
        assert self.nested_quant_map is not None and self.nested_absmax is not None
        nb = self.absmax.numel()
        scale = self.nested_absmax.float().repeat_interleave(NESTED_BLOCKSIZE)[:nb]
        values = self.nested_quant_map.float()[self.absmax.long()] * scale
        return values + torch.tensor(self.nested_offset, dtype=torch.float32)

    def to_state_dict(self, prefix: str, packed: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors ``Linear4bit`` saves under ``prefix`` (e.g. ``model.layers.0.mlp.up_proj.weight``)."""
        out = {prefix: packed, f"{prefix}.absmax": self.absmax, f"{prefix}.quant_map": self.quant_map}
        blob: dict[str, Any] = {"quant_type": self.quant_type, "blocksize": self.blocksize,
                                "dtype": str(self.dtype).removeprefix("torch."), "shape": list(self.shape)}
        if self.double_quant:
            out[f"{prefix}.nested_absmax"] = self.nested_absmax  # type: ignore[assignment]
            out[f"{prefix}.nested_quant_map"] = self.nested_quant_map  # type: ignore[assignment]
            blob.update({"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32",
                         "nested_offset": self.nested_offset})
        raw = json.dumps(blob).encode("utf-8")
        out[f"{prefix}.{STATE_PREFIX}{self.quant_type}"] = torch.tensor(list(raw), dtype=torch.uint8)
        return out

    @classmethod
    def from_state_dict(cls, prefix: str, tensors: Mapping[str, torch.Tensor], path: object = None) -> QuantState:
        """The state stored under ``prefix``, checked against the packed weight before any kernel runs."""
        blobs = [k for k in tensors if k.startswith(f"{prefix}.{STATE_PREFIX}")]
        if len(blobs) != 1:
            raise InputError("expected exactly one quant_state blob", path=path, tensor=prefix)
        blob = parse_state(tensors[blobs[0]], blobs[0], path)
        nested = "nested_offset" in blob
        try:
            state = cls(blob["quant_type"], blob["blocksize"], DTYPE_NAMES[blob["dtype"]], tuple(blob["shape"]),
                        tensors[f"{prefix}.absmax"], tensors[f"{prefix}.quant_map"],
                        tensors[f"{prefix}.nested_absmax"] if nested else None,
                        tensors[f"{prefix}.nested_quant_map"] if nested else None,
                        float(blob["nested_offset"]) if nested else None)
        except KeyError as exc:
            raise InputError(f"4-bit weight lacks {exc.args[0]}", path=path, tensor=prefix) from None
        if prefix in tensors:
            state.check(tensors[prefix], prefix, path)
        return state

    def check(self, packed: torch.Tensor, name: str = "", path: object = None) -> None:
        """Refuse a state whose tensors do not fit its shape: every kernel trusts these sizes, and a short
        absmax would make it read past the end and leave output uninitialised (docs/input-validation.md)."""
        n = math.prod(self.shape)
        blocks = -(-n // self.blocksize)
        hint = "the 4-bit checkpoint is corrupt or truncated; quantize it again"

        def need(ok: bool, what: str) -> None:
            if not ok:
                raise InputError(what, path=path, tensor=name or None, hint=hint)

        nbytes = packed.numel() * packed.element_size()
        need(nbytes == (n + 1) // 2, f"packed weight has {nbytes} bytes, shape {list(self.shape)} needs {(n + 1) // 2}")
        need(self.absmax.numel() == blocks, f"absmax has {self.absmax.numel()} values, {list(self.shape)} in blocks "
             f"of {self.blocksize} needs {blocks}")
        need(self.quant_map.numel() == 16 and self.quant_map.is_floating_point()
             and bool(torch.isfinite(self.quant_map.float()).all()), "quant_map must hold 16 finite floats")
        if self.double_quant:
            assert self.nested_absmax is not None and self.nested_quant_map is not None
            need(self.absmax.dtype == torch.uint8, f"absmax of a double-quantized weight must be U8 codes, got "
                 f"{str(self.absmax.dtype).removeprefix('torch.')}")
            nested = -(-blocks // NESTED_BLOCKSIZE)
            need(self.nested_absmax.numel() == nested and self.nested_absmax.is_floating_point()
                 and bool(torch.isfinite(self.nested_absmax.float()).all()),
                 f"nested_absmax must hold {nested} finite floats, has {self.nested_absmax.numel()}")
            need(self.nested_quant_map.numel() == 256 and self.nested_quant_map.is_floating_point()
                 and bool(torch.isfinite(self.nested_quant_map.float()).all()),
                 "nested_quant_map must hold 256 finite floats")
            need(self.nested_offset is not None and math.isfinite(self.nested_offset), "nested_offset is not finite")
        else:
            need(self.absmax.is_floating_point() and bool(torch.isfinite(self.absmax.float()).all()),
                 "absmax must hold finite floats")
        # A block's scale is the largest |value| of the block in the weight's own dtype, so it fits that dtype.
        largest = float(self.absmax_f32().abs().max()) if blocks else 0.0
        need(math.isfinite(largest) and largest <= torch.finfo(self.dtype).max,
             f"block scales reach {largest:g}, beyond what {str(self.dtype).removeprefix('torch.')} holds")
