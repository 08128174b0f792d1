"""Which tensors of a checkpoint are AWQ linears, judged from config.json and the headers alone (docs/awq.md,
"What a checkpoint holds"); every dtype and shape is checked before anything is read.

A checkpoint is AWQ when its ``quantization_config.quant_method`` is ``"awq"``. adaptools reads the GEMM layout
(``version: "gemm"``) with 4 bits and zero points; a linear ``M`` is then stored as ``M.qweight`` I32
``[in, out/8]``, ``M.qzeros`` I32 ``[in/group, out/8]`` and ``M.scales`` F16 ``[in/group, out]``, and its dense
``M.weight`` is F16 ``[out, in]``. Anything else that would be misread is refused naming the tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from adaptools import plugin
from adaptools.plugin import BaseTensor, InputError

from .codec import PACK

QWEIGHT, QZEROS, SCALES = ".qweight", ".qzeros", ".scales"
PARTS = (QWEIGHT, QZEROS, SCALES)
HINT = "the checkpoint is corrupt, or an AWQ variant adaptools does not read: docs/awq.md says which it reads"
CONFIG_SCHEMA = {
    "type": "object",
    "required": ["bits", "group_size"],
    "properties": {
        "bits": {"type": "integer"},
        "group_size": {"type": "integer", "minimum": -1, "maximum": 1 << 20},
        "zero_point": {"type": "boolean"},
        "version": {"type": "string"},
        "modules_to_not_convert": {"type": ["array", "null"], "items": {"type": "string"}},
    },
}


def awq_config(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The checked ``quantization_config`` of an AWQ checkpoint (None: not one); a variant adaptools would
    misread (GEMV and the other kernel layouts, bits other than 4, no zero points) is refused."""
    quant = config.get("quantization_config")
    if not isinstance(quant, dict) or quant.get("quant_method") != "awq":
        return None
    plugin.check_json(quant, CONFIG_SCHEMA, what="config.json quantization_config", hint=HINT)
    where = "config.json quantization_config"
    version = str(quant.get("version", "gemm")).lower()
    if version != "gemm":
        raise InputError(f"AWQ version {quant.get('version')!r}: adaptools reads only the GEMM layout "
                         "(docs/awq.md)", tensor=f"{where}.version", hint=HINT)
    if quant["bits"] != 4:
        raise InputError(f"{quant['bits']}-bit AWQ: the GEMM layout stores 4 bits", tensor=f"{where}.bits",
                         hint=HINT)
    if quant.get("zero_point", True) is not True:
        raise InputError("AWQ without zero points is not read", tensor=f"{where}.zero_point", hint=HINT)
    if quant["group_size"] == 0 or quant["group_size"] < -1:
        raise InputError(f"group_size {quant['group_size']}", tensor=f"{where}.group_size", hint=HINT)
    return quant


def _refuse(message: str, name: str) -> InputError:
    return InputError(message, tensor=name, hint=HINT)


def _check_module(module: str, tensors: Mapping[str, BaseTensor], group_size: int) -> tuple[int, int]:
    """The dense ``(out, in)`` of AWQ linear ``module``, its three tensors' dtypes and shapes checked against
    each other and against the config's ``group_size`` (-1: one group of all inputs)."""
    lone = tensors.get(module + SCALES)
    if lone is not None and len(lone.shape) == 1 and not any(module + p in tensors for p in (QWEIGHT, QZEROS)):
        raise _refuse("activation scales (AWQ's ScaledActivation, used for Falcon, MPT, GPT-J, GPT-NeoX, BigCode "
                      "and BLOOM): adaptools does not fold them into a dense model", module + SCALES)
    for part in PARTS:
        if module + part not in tensors:
            raise _refuse(f"missing: an AWQ linear stores {', '.join(module + p for p in PARTS)}", module + part)
    qweight, qzeros, scales = (tensors[module + part] for part in PARTS)
    if qweight.dtype != "I32" or len(qweight.shape) != 2 or 0 in qweight.shape:
        raise _refuse(f"{qweight.dtype} {list(qweight.shape)}: an AWQ qweight is I32 [in, out/8]", module + QWEIGHT)
    rows, width = qweight.shape
    if scales.dtype != "F16" or len(scales.shape) != 2 or 0 in scales.shape:
        raise _refuse(f"{scales.dtype} {list(scales.shape)}: AWQ scales are F16 [in/group, out]", module + SCALES)
    groups, cols = scales.shape
    if cols % PACK:
        raise _refuse(f"{cols} output features: AWQ packs them eight to an int32, so they must be a multiple of 8",
                      module + SCALES)
    if cols != width * PACK:
        raise _refuse(f"{qweight.dtype} {list(qweight.shape)} packs {width * PACK} output features, but "
                      f"{module + SCALES} {list(scales.shape)} has {cols}", module + QWEIGHT)
    group = rows if group_size == -1 else group_size
    if rows % group:
        raise _refuse(f"{rows} input features are no whole number of groups of {group} (config group_size)",
                      module + QWEIGHT)
    if groups * group != rows:
        raise _refuse(f"{qweight.dtype} {list(qweight.shape)} has {rows} inputs, but {module + SCALES} "
                      f"{list(scales.shape)} holds {groups} groups of {group}", module + QWEIGHT)
    if qzeros.dtype != "I32" or tuple(qzeros.shape) != (groups, width):
        raise _refuse(f"{qzeros.dtype} {list(qzeros.shape)}; the zero points of this linear are I32 "
                      f"{[groups, width]}", module + QZEROS)
    if module + ".weight" in tensors:
        raise _refuse("both a dense weight and AWQ tensors for the same linear", module + ".weight")
    return cols, rows


def scan(tensors: Mapping[str, BaseTensor], config: Mapping[str, Any]) -> dict[str, tuple[int, int]] | None:
    """``{M.weight: (out, in)}`` for every AWQ linear (None: not an AWQ checkpoint), headers checked."""
    quant = awq_config(config)
    if quant is None:
        return None
    modules = sorted({name.rpartition(".")[0] for name in tensors if name.endswith(PARTS)})
    return {module + ".weight": _check_module(module, tensors, quant["group_size"]) for module in modules}
