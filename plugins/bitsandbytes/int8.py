"""bitsandbytes LLM.int8 weights, as transformers saves a ``load_in_8bit=True`` model (docs/int8.md).

A quantized linear ``P`` is stored as ``P.weight`` (int8 ``[out, in]``), ``P.SCB`` (fp32 ``[out]``, each
row's absolute maximum) and ``P.weight_format`` (a uint8 scalar, 0 for the row-major layout). The backends
here recognise such groups, so a merge, ``dequantize`` or ``merge --requantize`` reads an 8-bit checkpoint
as if it were dense:

- decoding is bitsandbytes' ``int8_vectorwise_dequant`` (``CB · SCB · (1/127)`` in fp32, in that order),
  rounded once to the model's dtype, as transformers' ``dequantize`` does;
- encoding is bitsandbytes' ``int8_vectorwise_quant`` as ``Int8Params`` calls it when transformers
  quantizes (cast to fp16, row absmax, ``round(x · (127 / absmax))``), byte for byte.

The dense dtype of a group is the checkpoint's own (the dtype its unquantized tensors are stored in), which
the backend cannot read from the group alone; so one backend is registered per dense dtype, and only the
one matching the checkpoint claims its groups. Nothing here imports bitsandbytes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from adaptools import plugin
from adaptools.plugin import BaseTensor, InputError

#: bitsandbytes' ``1/127`` as its dequantization writes it (a Python float; fp32 arithmetic rounds it once).
INV_127 = 7.874015718698502e-3
#: ``weight_format`` values bitsandbytes names (``LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING``); only 0 is readable.
WEIGHT_FORMATS = {0: "row", 1: "col32", 2: "col_turing", 3: "col_ampere"}
DENSE = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
#: Architectures whose linears are transformers' Conv1D (weight stored [in, out]): bitsandbytes stores them
#: transposed, so their dense view would not be the dense checkpoint's layout (docs/int8.md, "Not covered").
CONV1D_MODELS = ("gpt2", "openai-gpt", "decision_transformer", "imagegpt", "clvp")
#: Rows processed at a time, to bound the fp32 temporaries of a large weight (results do not depend on it).
ROW_BLOCK = 2048
#: Module names of input embeddings: transformers never converts them (they are not nn.Linear).
EMBEDDINGS = ("embed_tokens", "wte", "wpe", "word_embeddings", "embed_in", "tok_embeddings", "embeddings",
              "position_embeddings", "embed_positions", "shared")


def quantize_int8(weight: torch.Tensor, where: str = "<weight>") -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 ``CB``, fp32 ``SCB``) of a 2-D weight, byte-identical to bitsandbytes 0.50.2's CPU
    ``int8_vectorwise_quant(weight.to(float16))`` (docs/int8.md, "Quantization (bytes identical to
    bitsandbytes)"). A zero row gets code 0 (bitsandbytes casts a NaN there, which is undefined behaviour
    that happens to give 0 on x86)."""
    if weight.dim() != 2:
        raise InputError(f"an 8-bit weight must be 2-D, this one is {list(weight.shape)}", tensor=where)
    half = weight.to(torch.float16)
    if not torch.isfinite(half).all():
        raise InputError("holds NaN/Inf, or values beyond float16's range (65504) that LLM.int8 cannot store",
                         tensor=where, hint="keep this layer in 16-bit")
    scb = half.abs().amax(dim=1).float() if half.shape[1] else torch.zeros(half.shape[0])
    codes = torch.empty(half.shape, dtype=torch.int8)
    for start in range(0, half.shape[0], ROW_BLOCK):
        rows = slice(start, start + ROW_BLOCK)
        scaled = torch.round(half[rows] * (127.0 / scb[rows].unsqueeze(-1)))
        codes[rows] = scaled.nan_to_num_(0.0).to(torch.int8)
    return codes, scb


def dequantize_int8(codes: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """bitsandbytes' ``int8_vectorwise_dequant``: ``CB · SCB · 7.874015718698502e-3`` in fp32, evaluated left
    to right (another order gives other bits, docs/int8.md, "Dequantization
    (bit-identical to bitsandbytes)"), then rounded once to ``dtype``."""
    out = torch.empty(codes.shape, dtype=dtype)
    for start in range(0, codes.shape[0], ROW_BLOCK):
        rows = slice(start, start + ROW_BLOCK)
        out[rows] = (codes[rows] * scb[rows].view(-1, 1) * INV_127).to(dtype)
    return out


def quantization_config(skip_modules: list[str] | None = None, threshold: float = 6.0) -> dict[str, Any]:
    """The ``quantization_config`` block transformers writes into config.json for a ``load_in_8bit`` model
    (its ``BitsAndBytesConfig`` with the 4-bit fields at their defaults).

    A skip list *replaces* transformers' default skips when it loads the model, the output embedding
    included; so a given list is written with ``lm_head`` in front, which :func:`quantized_weights` never
    quantizes (docs/int8.md, "Quantizing a dense model (`requantize --quant-type int8`)")."""
    skip = list(dict.fromkeys(["lm_head", *skip_modules])) if skip_modules else None
    return {"_load_in_4bit": False, "_load_in_8bit": True, "bnb_4bit_compute_dtype": "float32",
            "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False,
            "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": skip, "llm_int8_threshold": threshold,
            "load_in_4bit": False, "load_in_8bit": True, "quant_method": "bitsandbytes"}


def skipped(module: str, patterns: list[str]) -> bool:
    """transformers' ``should_convert_module`` negated: a pattern matches from the start up to a module
    boundary, as a regex with the same boundary, or as a suffix of the module name."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    try:
        return any(re.match(rf"(?:{p}){boundary}", module) or module.endswith(p) for p in patterns)
    except re.error as exc:
        raise InputError(f"skip pattern is not a valid regular expression ({exc})") from None


def quantized_weights(tensors: Mapping[str, BaseTensor], aliases: Mapping[str, str] | None = None,
                      skip_modules: list[str] | None = None) -> list[str]:
    """Which dense weights to store as LLM.int8 so that transformers, loading with
    :func:`quantization_config` ``(skip_modules)``, builds ``Linear8bitLt`` for exactly these (docs/int8.md,
    "Quantizing a dense model (`requantize --quant-type int8`)"), judged from headers: every 2-D floating
    ``*.weight`` of a linear layer, except input embeddings,
    the output embedding (``lm_head``), both sides of a tie (``aliases``: ``lm_head.weight`` -> the
    embedding) and modules matching ``skip_modules`` (transformers' rule: from the start up to a module
    boundary, as a regex, or as a suffix).

    Not visible in headers: a model class's ``_keep_in_fp32_modules`` (pass them in ``skip_modules``) and
    transformers' "last parameter" skip, which for a causal LM is the output embedding or a norm."""
    ties = [name.removesuffix(".weight") for pair in (aliases or {}).items() for name in pair]
    patterns = ["lm_head", *ties, *(skip_modules or [])]
    out = []
    for name, tensor in tensors.items():
        module = name.removesuffix(".weight")
        if (name == module or len(tensor.shape) != 2 or tensor.dtype not in DENSE
                or module.rpartition(".")[2] in EMBEDDINGS or skipped(module, patterns)):
            continue
        out.append(name)
    return out


def model_dtype(tensors: Mapping[str, BaseTensor], quantized: set[str]) -> str:
    """The dtype most of a checkpoint's unquantized floating elements are stored in (F16 if none)."""
    counts: dict[str, int] = {}
    for name, tensor in tensors.items():
        if name not in quantized and tensor.dtype in DENSE:
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + math.prod(tensor.shape)
    return max(sorted(counts), key=lambda d: counts[d]) if counts else "F16"


class Int8(plugin.Backend):
    """LLM.int8 groups in a checkpoint whose dense tensors are ``dense`` (F16, BF16 or F32)."""

    def __init__(self, dense: str):
        self.dense, self.dtype = dense, DENSE[dense]
        suffix = {"F16": "", "BF16": "_bf16", "F32": "_fp32"}[dense]
        self.name = f"int8{suffix}"  # type: ignore[misc]
        self.description = (f"bitsandbytes LLM.int8 weights (int8 rows + SCB) in a {str(self.dtype)[6:]} model: "  # type: ignore[misc]
                            "bitsandbytes' decode, byte-exact encode")
        self._shapes: dict[str, tuple[int, ...]] = {}

    def find_groups(self, tensors: Mapping[str, BaseTensor]) -> dict[str, list[str]]:
        """``P.weight`` -> ``[P.SCB, P.weight_format]`` for every 8-bit linear, with the headers checked;
        empty unless the checkpoint's dense dtype is this backend's."""
        groups: dict[str, list[str]] = {}
        shapes = {}
        for name, scb in tensors.items():
            if not name.endswith(".SCB"):
                continue
            module = name[: -len(".SCB")]
            weight = tensors.get(f"{module}.weight")
            if weight is None or weight.dtype != "I8" or len(weight.shape) != 2:
                found = "missing" if weight is None else f"{weight.dtype} {list(weight.shape)}"
                raise InputError(f"row scales of an 8-bit weight, but {module}.weight is {found}, not a 2-D I8 "
                                 "tensor", tensor=name, hint="re-save the checkpoint with transformers")
            if scb.dtype != "F32" or tuple(scb.shape) != weight.shape[:1]:
                raise InputError(f"{scb.dtype} {list(scb.shape)}: the row scales of {module}.weight "
                                 f"({weight.shape[0]} rows) must be F32 [{weight.shape[0]}]", tensor=name,
                                 hint="the file is corrupt")
            companions = [name]
            fmt = tensors.get(f"{module}.weight_format")
            if fmt is not None:
                if fmt.dtype != "U8" or math.prod(fmt.shape) != 1:
                    raise InputError(f"{fmt.dtype} {list(fmt.shape)}, expected a U8 scalar", tensor=fmt.name)
                companions.append(fmt.name)
            groups[weight.name] = companions
            shapes[weight.name] = tuple(weight.shape)
        if not groups or model_dtype(tensors, {n for g in groups.items() for n in (g[0], *g[1])}) != self.dense:
            return {}
        config = getattr(tensors, "config", None) or {}
        text = config.get("text_config")
        model_type = (text if isinstance(text, dict) else config).get("model_type")
        if model_type in CONV1D_MODELS:
            raise InputError(f"an 8-bit {model_type} checkpoint: its Conv1D layers were transposed when quantized, "
                             "and reading them back in the dense layout is not supported",
                             tensor=next(iter(groups)), hint="merge into the 16-bit original instead")
        # group_info gets only a reader, and the weight's column count is in its header: Checkpoint calls
        # group_info right after this scan, so the scan's shapes are handed over here (read once each).
        self._shapes = shapes
        return groups

    def _validate(self, param: str, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """The row scales, after checking the small tensors' values; raise InputError naming the tensor."""
        module = param.removesuffix(".weight")
        scb = read(f"{module}.SCB")
        if not (torch.isfinite(scb).all() and (scb >= 0).all()):
            raise InputError("row scales with NaN, Inf or negative values", tensor=f"{module}.SCB",
                             hint="the file is corrupt")
        try:
            fmt = read(f"{module}.weight_format")
        except KeyError:
            return scb  # absent: bitsandbytes assumes the row layout
        value = int(fmt.reshape(-1)[0])
        if value != 0:
            raise InputError(f"weight_format {value} ({WEIGHT_FORMATS.get(value, 'unknown')}): only the row-major "
                             "layout (0) is read", tensor=f"{module}.weight_format",
                             hint="save it again with a current bitsandbytes, which writes the row layout")
        return scb

    def group_info(self, param: str, read: Callable[[str], torch.Tensor]) -> tuple[torch.dtype, tuple[int, ...]]:
        """Dense dtype and shape; only the row scales and the format scalar are read (and checked)."""
        scb = self._validate(param, read)
        shape = self._shapes.pop(param, None)  # used once: a later call for another checkpoint reads the weight
        if shape is None or shape[0] != scb.numel():
            shape = tuple(read(param).shape)
        return self.dtype, shape

    def decode_group(self, param: str, read: Callable[[str], torch.Tensor], names: list[str],
                     settings: Mapping[str, Any] | None = None) -> torch.Tensor:
        codes, scb = read(param), read(param.removesuffix(".weight") + ".SCB")
        if codes.dtype != torch.int8 or codes.dim() != 2 or scb.shape != codes.shape[:1]:
            raise InputError(f"an 8-bit weight {codes.dtype} {list(codes.shape)} with {list(scb.shape)} row scales",
                             tensor=param)
        return dequantize_int8(codes, scb.float(), self.dtype)

    def group_settings(self, param: str, read: Callable[[str], torch.Tensor]) -> dict[str, Any]:
        return {}  # LLM.int8 weights have no settings: one scale per row, always from fp16

    def encode_group(self, param: str, dense: torch.Tensor, settings: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The three tensors ``Linear8bitLt`` saves for ``dense``, named as the checkpoint names them."""
        codes, scb = quantize_int8(dense, param)
        module = param.removesuffix(".weight")
        return {param: codes, f"{module}.SCB": scb, f"{module}.weight_format": torch.tensor(0, dtype=torch.uint8)}

    def quantize_settings(self, tensor: BaseTensor, options: Any) -> dict[str, Any]:
        """LLM.int8 has no settings: one absmax scale per row, whatever the options."""
        return {}

    def quantization_config(self, settings: Mapping[str, Any], options: Any) -> dict[str, Any]:
        """What config.json needs for transformers to load what :meth:`encode_group` wrote (``settings`` may
        carry an outlier ``threshold``; transformers' default is 6.0)."""
        return quantization_config(list(options.skip_modules) or None, float(settings.get("threshold", 6.0)))

    def quantize_options(self, config: Mapping[str, Any]) -> Any:
        """The options an 8-bit checkpoint was made with (its skip list, lm_head aside)."""
        if config.get("quant_method") != "bitsandbytes" or not config.get("load_in_8bit") or self.name != "int8":
            return None
        skip = [m for m in config.get("llm_int8_skip_modules") or () if m != "lm_head"]
        return plugin.QuantizeOptions(quant_type=self.name, skip_modules=tuple(skip))
