"""Which tensors of a checkpoint are GPTQ weights, judged from config.json and the headers alone (docs/gptq.md,
"What a checkpoint holds"); every size is checked before anything is read.

A checkpoint is GPTQ when its ``quantization_config.quant_method`` is ``"gptq"``. A quantized linear ``M`` of
``in`` inputs and ``out`` outputs stores ``M.qweight`` I32 ``[in * bits / 32, out]``, ``M.qzeros`` I32
``[groups, out * bits / 32]``, ``M.scales`` F16 ``[groups, out]`` and ``M.g_idx`` I32 ``[in]`` (each input's
group), where ``groups = in / group_size`` (one group when ``group_size`` is -1). Its dense weight is ``M.weight``
``[out, in]`` in the scales' dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from adaptools import plugin
from adaptools.plugin import BaseTensor, InputError

HINT = "the checkpoint is corrupt, or a GPTQ variant adaptools does not read: docs/gptq.md says which it reads"
BITS = (2, 3, 4, 8)
#: ``checkpoint_format`` -> whether stored zero points are the zero point minus one (docs/gptq.md, "Zero points").
FORMATS = {"gptq": True, "gptq_v2": False}
PARTS = ("qweight", "qzeros", "scales", "g_idx")
SCALE_TYPES = ("F16", "BF16", "F32")
#: Architectures whose linears are transformers' Conv1D (dense weight ``[in, out]``, not ``[out, in]``).
CONV1D_MODELS = ("gpt2", "openai-gpt", "decision_transformer", "imagegpt", "clvp")

CONFIG_SCHEMA = {
    "type": "object",
    "required": ["bits"],
    "properties": {
        "bits": {"type": "integer"},
        "group_size": {"type": "integer", "minimum": -1, "maximum": 1 << 24},
        "desc_act": {"type": ["boolean", "null"]},
        "sym": {"type": ["boolean", "null"]},
        "checkpoint_format": {"type": ["string", "null"]},
        "format": {"type": ["string", "null"]},
        "pack_dtype": {"type": ["string", "null"]},
        "dynamic": {"type": ["object", "null"]},
    },
}


@dataclass(frozen=True)
class Layout:
    """One stored GPTQ linear: bits, dense ``(out, in)``, the number of groups and the scales' dtype."""

    bits: int
    shape: tuple[int, int]
    groups: int
    scale_dtype: str
    names: tuple[str, ...]


def _refuse(message: str, name: str) -> InputError:
    return InputError(message, tensor=name, hint=HINT)


def gptq_config(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The checked ``quantization_config`` of a GPTQ checkpoint, or None when it is not one. What adaptools
    cannot honour (other bit widths, packed formats other than ``gptq``/``gptq_v2``, per-module ``dynamic``
    overrides, packing words other than int32) is refused here, naming the field."""
    quant = config.get("quantization_config")
    if not isinstance(quant, dict) or quant.get("quant_method") != "gptq":
        return None
    plugin.check_json(quant, CONFIG_SCHEMA, what="config.json quantization_config", hint=HINT)
    if quant["bits"] not in BITS:
        raise _refuse(f"bits {quant['bits']}: adaptools reads GPTQ weights of 2, 3, 4 or 8 bits",
                      "quantization_config.bits")
    fmt = checkpoint_format(quant)
    if fmt not in FORMATS:
        raise _refuse(f"checkpoint_format {fmt!r}: adaptools reads 'gptq' and 'gptq_v2'",
                      "quantization_config.checkpoint_format")
    if quant.get("dynamic"):
        raise _refuse("per-module overrides (dynamic) are not read", "quantization_config.dynamic")
    if quant.get("pack_dtype") not in (None, "int32", "torch.int32"):
        raise _refuse(f"pack_dtype {quant['pack_dtype']!r}: adaptools reads int32 words",
                      "quantization_config.pack_dtype")
    if quant.get("group_size", -1) == 0 or quant.get("group_size", -1) < -1:
        raise _refuse("group_size must be positive or -1", "quantization_config.group_size")
    return quant


def checkpoint_format(quant: Mapping[str, Any]) -> str:
    """``checkpoint_format`` (GPTQModel also writes it as ``format``); ``gptq`` when neither is given, as
    AutoGPTQ and optimum save."""
    return str(quant.get("checkpoint_format") or quant.get("format") or "gptq")


def _expect(tensors: Mapping[str, BaseTensor], name: str, dtypes: tuple[str, ...], shape: tuple[int, ...]) -> None:
    tensor = tensors.get(name)
    if tensor is None:
        raise _refuse("missing: a GPTQ linear stores qweight, qzeros, scales and g_idx", name)
    if tensor.dtype not in dtypes or tuple(tensor.shape) != shape:
        raise _refuse(f"{tensor.dtype} {list(tensor.shape)}; this GPTQ linear stores {'/'.join(dtypes)} "
                      f"{list(shape)} here", name)


def checked(module: str, tensors: Mapping[str, BaseTensor], bits: int, group_size: int) -> Layout:
    """The layout of ``module``, every part's dtype and shape checked against the others and the config: the
    inputs and outputs come from ``qweight``'s shape and the config's bits."""
    names = tuple(f"{module}.{part}" for part in PARTS)
    qweight, _, scales, g_idx = names
    for name in names:
        if name not in tensors:
            raise _refuse("missing: a GPTQ linear stores qweight, qzeros, scales and g_idx", name)
        if len(tensors[name].shape) != (1 if name == g_idx else 2):
            raise _refuse(f"{list(tensors[name].shape)}: wrong number of dimensions", name)
    rows, outputs = tensors[qweight].shape
    inputs = rows * 32 // bits
    if rows == 0 or rows * 32 % bits or tensors[g_idx].shape[0] != inputs:
        raise _refuse(f"{tensors[g_idx].shape[0]} inputs, but qweight's {rows} rows of codes at bits={bits} hold "
                      f"{rows * 32 / bits:g}", g_idx)
    block = 32 if bits == 3 else 32 // bits  # codes per packed unit along either dimension
    if inputs % block:
        raise _refuse(f"{inputs} inputs do not fill whole {bits}-bit packed words", qweight)
    if outputs == 0 or outputs % block:
        raise _refuse(f"{outputs} outputs do not fill whole {bits}-bit packed words", qweight)
    size = inputs if group_size == -1 else group_size
    if inputs % size:
        raise _refuse(f"{inputs} inputs are no whole number of groups of {size}", qweight)
    groups = inputs // size
    _expect(tensors, g_idx, ("I32",), (inputs,))
    _expect(tensors, qweight, ("I32",), (inputs * bits // 32, outputs))
    _expect(tensors, f"{module}.qzeros", ("I32",), (groups, outputs * bits // 32))
    _expect(tensors, scales, SCALE_TYPES, (groups, outputs))
    return Layout(bits, (outputs, inputs), groups, tensors[scales].dtype, names)


def scan(tensors: Mapping[str, BaseTensor], config: Mapping[str, Any], v1: bool) -> dict[str, Layout]:
    """``{M.weight: Layout}`` for every GPTQ linear of a GPTQ checkpoint whose zero points are stored as ``v1``
    says (empty otherwise), headers and config checked."""
    quant = gptq_config(config)
    if quant is None or FORMATS[checkpoint_format(quant)] != v1:
        return {}
    bits, group_size = int(quant["bits"]), int(quant.get("group_size", -1))
    modules = sorted({name.rpartition(".")[0] for name in tensors if name.rpartition(".")[2] in PARTS})
    text = config.get("text_config")
    model_type = (text if isinstance(text, dict) else config).get("model_type")
    if model_type in CONV1D_MODELS and modules:
        raise _refuse(f"a GPTQ {model_type} checkpoint: its Conv1D weights are stored [in, out], and GPTQ packed "
                      "them transposed; writing them back in that layout is not supported", f"{modules[0]}.qweight")
    layouts = {}
    for module in modules:
        if f"{module}.weight" in tensors:
            raise _refuse("both a dense weight and GPTQ tensors", f"{module}.weight")
        layouts[f"{module}.weight"] = checked(module, tensors, bits, group_size)
    return layouts
