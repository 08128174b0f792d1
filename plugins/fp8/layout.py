"""Which tensors of a checkpoint are fine-grained FP8 weights, judged from config.json and the headers alone
(docs/fp8.md, "What a checkpoint holds"), every size checked before anything is read or allocated.

A checkpoint is FP8 when its ``quantization_config.quant_method`` is ``"fp8"``. A weight ``P.weight`` is then
stored as a 2-D ``F8_E4M3`` tensor with an ``F32`` ``P.weight_scale_inv`` of the grid's shape,
``[ceil(rows / B0), ceil(cols / B1)]`` for ``weight_block_size = [B0, B1]`` (default ``[128, 128]``). What
adaptools cannot read exactly is refused naming it: per-tensor scales (``weight_block_size: null``),
power-of-two ``ue8m0`` scales, static activation scales, fused 3-D experts, FP8 tensors without scales.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from adaptools import plugin
from adaptools.plugin import BaseTensor, InputError

from .codec import grid

DEFAULT_BLOCK = (128, 128)
#: Largest block side accepted from a config (real checkpoints use 128); it bounds everything sized from it.
MAX_BLOCK = 1 << 16
SCALE_SUFFIX = "_scale_inv"
#: The quantization_config fields adaptools reads; ``null`` means transformers' default for each.
CONFIG_SCHEMA = {
    "type": "object",
    "properties": {
        "weight_block_size": {"type": "array", "minItems": 2, "maxItems": 2,
                              "items": {"type": "integer", "minimum": 1, "maximum": MAX_BLOCK,
                                        "description": f"an integer from 1 to {MAX_BLOCK}"},
                              "description": f"two integers from 1 to {MAX_BLOCK}"},
        "activation_scheme": {"enum": ["dynamic", None], "description": "\"dynamic\" (static activation "
                                                                         "scales are not read)"},
        "scale_fmt": {"enum": ["float", None], "description": "\"float\" (ue8m0 scales are not read)"},
        "modules_to_not_convert": {"type": ["array", "null"], "items": {"type": "string"}},
    },
}
HINT = "the checkpoint is corrupt, or an FP8 variant adaptools does not read: docs/fp8.md says which it reads"


@dataclass(frozen=True)
class Layout:
    """One stored FP8 weight: its shape and block (hence its scale grid)."""

    shape: tuple[int, int]
    block: tuple[int, int]

    @property
    def grid(self) -> tuple[int, int]:
        return grid(self.shape, self.block)


def fp8_config(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The checked ``quantization_config`` of an FP8 checkpoint, or None when the checkpoint is not one."""
    quant = config.get("quantization_config")
    if not isinstance(quant, dict) or quant.get("quant_method") != "fp8":
        return None
    if "weight_block_size" in quant and quant["weight_block_size"] is None:
        raise InputError("quantization_config.weight_block_size is null: per-tensor FP8 scales are not read",
                         hint="only block-wise (fine-grained) FP8 checkpoints are supported")
    plugin.check_json(quant, CONFIG_SCHEMA, what="config.json quantization_config", hint=HINT)
    return quant


def block_of(quant: Mapping[str, Any]) -> tuple[int, int]:
    rows, cols = quant.get("weight_block_size") or DEFAULT_BLOCK
    return int(rows), int(cols)


def model_dtype(config: Mapping[str, Any], tensors: Mapping[str, BaseTensor]) -> str:
    """The dtype transformers gives the dense model (safetensors code): config.json's ``dtype`` (or
    ``torch_dtype``), else the one most unquantized floating elements are stored in, else bfloat16."""
    text = config.get("text_config")
    for source in (config, text if isinstance(text, dict) else {}):
        for key in ("dtype", "torch_dtype"):
            named = next((t.code for t in plugin.FLOAT_TYPES if t.config == source.get(key)), None)
            if named:
                return named
    counts: dict[str, int] = {}
    for tensor in tensors.values():
        if tensor.dtype in ("BF16", "F16", "F32") and not tensor.name.endswith(SCALE_SUFFIX):
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + math.prod(tensor.shape)
    return max(sorted(counts), key=lambda d: counts[d]) if counts else "BF16"


def _refuse(message: str, name: str) -> InputError:
    return InputError(message, tensor=name, hint=HINT)


def scan(tensors: Mapping[str, BaseTensor], config: Mapping[str, Any]) -> dict[str, Layout] | None:
    """``{P.weight: Layout}`` for every FP8 weight of an FP8 checkpoint (None: not an FP8 checkpoint), with
    its headers checked; InputError naming the tensor for anything adaptools would misread."""
    quant = fp8_config(config)
    if quant is None:
        return None
    block = block_of(quant)
    layouts: dict[str, Layout] = {}
    for name, scale in tensors.items():
        if name.endswith(".activation_scale"):
            raise _refuse("a static activation scale: only dynamic-activation FP8 checkpoints are read", name)
        if not name.endswith(SCALE_SUFFIX):
            continue
        param = name[: -len(SCALE_SUFFIX)]
        weight = tensors.get(param)
        if not param.endswith(".weight"):
            raise _refuse(f"block scales of {param}, which is not a linear's .weight (fused experts are not read)",
                          name)
        if weight is None:
            raise _refuse(f"block scales of {param}, which the checkpoint does not hold", name)
        if weight.dtype != "F8_E4M3" or len(weight.shape) != 2:
            raise _refuse(f"block scales of a {weight.dtype} {list(weight.shape)} weight; an FP8 weight is a 2-D "
                          "F8_E4M3 tensor", name)
        layout = Layout((weight.shape[0], weight.shape[1]), block)
        if scale.dtype != "F32" or tuple(scale.shape) != layout.grid:
            raise _refuse(f"{scale.dtype} {list(scale.shape)}: the scales of a {list(weight.shape)} weight in "
                          f"{block[0]}x{block[1]} blocks must be F32 {list(layout.grid)}", name)
        layouts[param] = layout
    for name, tensor in tensors.items():
        if tensor.dtype in ("F8_E4M3", "F8_E5M2") and name not in layouts:
            raise _refuse(f"an {tensor.dtype} tensor without {name}{SCALE_SUFFIX}: only block-scaled FP8 "
                          "weights are read", name)
    return layouts
