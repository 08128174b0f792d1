"""Which tensors of a checkpoint are MXFP4 expert parameters, judged from config.json and the headers alone
(docs/mxfp4.md, "What a checkpoint holds"), every size checked before anything is read.

A checkpoint is MXFP4 when its ``quantization_config.quant_method`` is ``"mxfp4"``. A parameter ``P`` is then
stored as ``P_blocks`` (``U8 [*prefix, R, G, 16]``) and ``P_scales`` (``U8 [*prefix, R, G]``), and its dense
value is ``[*prefix, G·32, R]``. Half a pair, another dtype or shapes that disagree are refused naming the
tensor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from adaptools import plugin
from adaptools.plugin import BaseTensor, InputError

from .codec import dense_shape

BLOCKS, SCALES = "_blocks", "_scales"
CONFIG_SCHEMA = {
    "type": "object",
    "properties": {
        "modules_to_not_convert": {"type": ["array", "null"], "items": {"type": "string"}},
        "dequantize": {"type": ["boolean", "null"]},
    },
}
HINT = "the checkpoint is corrupt, or not an MXFP4 checkpoint as transformers writes it (docs/mxfp4.md)"


def mxfp4_config(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The checked ``quantization_config`` of an MXFP4 checkpoint, or None when the checkpoint is not one."""
    quant = config.get("quantization_config")
    if not isinstance(quant, dict) or quant.get("quant_method") != "mxfp4":
        return None
    plugin.check_json(quant, CONFIG_SCHEMA, what="config.json quantization_config", hint=HINT)
    return quant


def model_dtype(config: Mapping[str, Any]) -> str:
    """The dtype transformers dequantizes to: config.json's ``dtype`` (or ``torch_dtype``), else bfloat16
    (transformers' MXFP4 dequantization defaults to it)."""
    for key in ("dtype", "torch_dtype"):
        named = next((t.code for t in plugin.FLOAT_TYPES if t.config == config.get(key)), None)
        if named:
            return named
    return "BF16"


def _refuse(message: str, name: str) -> InputError:
    return InputError(message, tensor=name, hint=HINT)


def scan(tensors: Mapping[str, BaseTensor], config: Mapping[str, Any]) -> dict[str, tuple[int, ...]] | None:
    """``{P: dense shape}`` for every MXFP4 parameter of an MXFP4 checkpoint (None: not one), headers checked."""
    if mxfp4_config(config) is None:
        return None
    found: dict[str, tuple[int, ...]] = {}
    for name, blocks in tensors.items():
        if name.endswith(SCALES) and name[: -len(SCALES)] + BLOCKS not in tensors:
            raise _refuse(f"MXFP4 scales without {name[: -len(SCALES)] + BLOCKS}", name)
        if not name.endswith(BLOCKS):
            continue
        param = name[: -len(BLOCKS)]
        scales = tensors.get(param + SCALES)
        if scales is None:
            raise _refuse(f"MXFP4 blocks without {param + SCALES}", name)
        shape = tuple(blocks.shape)
        if blocks.dtype != "U8" or len(shape) < 3 or shape[-1] != 16 or math.prod(shape) == 0:
            raise _refuse(f"{blocks.dtype} {list(shape)}: MXFP4 blocks are U8 [..., rows, groups, 16]", name)
        if scales.dtype != "U8" or tuple(scales.shape) != shape[:-1]:
            raise _refuse(f"{scales.dtype} {list(scales.shape)}: the scales of blocks {list(shape)} must be U8 "
                          f"{list(shape[:-1])}", param + SCALES)
        if param in tensors:
            raise _refuse("both a dense tensor and MXFP4 blocks of the same parameter", param)
        found[param] = dense_shape(shape)
    return found
