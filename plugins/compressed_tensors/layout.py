"""Which tensors of a checkpoint are compressed-tensors weights, and in which scheme, judged from config.json and
the headers alone (docs/compressed-tensors.md, "What a checkpoint holds"); every size is checked before anything
is read or allocated.

A checkpoint is compressed-tensors when its ``quantization_config.quant_method`` is ``"compressed-tensors"``. The
config lists ``config_groups``, each a scheme (``weights``: bits, int or float, strategy, group size, block,
symmetric) applied to the modules its ``targets`` name, in the ``format`` of the group (else the config's). A
quantized module ``M`` stores, by format:

- ``pack-quantized``: ``M.weight_packed`` I32 ``[rows, ceil(cols * bits / 32)]``, ``M.weight_shape`` (the dense
  ``[rows, cols]``), ``M.weight_scale``, and when asymmetric ``M.weight_zero_point`` (packed the other way);
- ``float-quantized`` / ``int-quantized``: ``M.weight`` F8_E4M3 / I8 ``[rows, cols]`` and ``M.weight_scale``
  (plus ``M.weight_zero_point`` I8 when asymmetric).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from adaptools import plugin
from adaptools.plugin import BaseTensor, InputError

HINT = ("the checkpoint is corrupt, or a compressed-tensors variant adaptools does not read: "
        "docs/compressed-tensors.md says which it reads")
FORMATS = ("pack-quantized", "float-quantized", "int-quantized", "nvfp4-pack-quantized")
NVFP4 = "nvfp4-pack-quantized"
#: Formats whose weight is stored under another name than ``M.weight``.
PACKED = ("pack-quantized", NVFP4)
SCALE_TYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
#: Activation tensors a module may carry beside its weight; adaptools reads only dynamic activations.
ACTIVATION_PARAMS = ("input_scale", "input_zero_point", "input_global_scale", "output_scale", "output_zero_point")

_ARGS = {
    "type": ["object", "null"],
    "properties": {
        "num_bits": {"type": "integer", "minimum": 1, "maximum": 8},
        "type": {"enum": ["int", "float"]},
        "symmetric": {"type": "boolean"},
        "strategy": {"enum": ["tensor", "channel", "group", "block", "token", "tensor_group", None]},
        "group_size": {"type": ["integer", "null"], "minimum": -1, "maximum": 1 << 20},
        "block_structure": {"type": ["array", "null"], "minItems": 2, "maxItems": 2,
                            "items": {"type": "integer", "minimum": 1, "maximum": 1 << 16}},
        "actorder": {"enum": [None, False, "weight", "static"],
                     "description": "null or \"weight\" (act-order \"group\" stores g_idx, which is not read)"},
    },
}
CONFIG_SCHEMA = {
    "type": "object",
    "required": ["config_groups"],
    "properties": {
        "format": {"type": ["string", "null"]},
        "ignore": {"type": ["array", "null"], "items": {"type": "string"}},
        "config_groups": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["targets"],
            "properties": {"targets": {"type": "array", "items": {"type": "string"}},
                           "format": {"type": ["string", "null"]}, "weights": _ARGS,
                           "input_activations": {"type": ["object", "null"]},
                           "output_activations": {"type": ["object", "null"]}}}},
    },
}


@dataclass(frozen=True)
class Scheme:
    """How one module's weight is quantized: the config group's ``weights`` arguments and its format."""

    format: str
    bits: int
    kind: str  # "int" or "float"
    strategy: str
    symmetric: bool = True
    group_size: int = 0
    block: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class Layout:
    """One stored compressed weight: its scheme, dense shape, the scale's dtype and its stored tensors."""

    scheme: Scheme
    shape: tuple[int, int]
    scale_dtype: str
    names: tuple[str, ...]


def _refuse(message: str, name: str) -> InputError:
    return InputError(message, tensor=name, hint=HINT)


def ct_config(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The checked ``quantization_config`` of a compressed-tensors checkpoint, or None when it is not one."""
    quant = config.get("quantization_config")
    if not isinstance(quant, dict) or quant.get("quant_method") != "compressed-tensors":
        return None
    plugin.check_json(quant, CONFIG_SCHEMA, what="config.json quantization_config", hint=HINT)
    return quant


def _scheme(name: str, group: Mapping[str, Any], default_format: str | None) -> Scheme | None:
    args = group.get("weights")
    fmt = group.get("format") or default_format
    if not args:
        return None
    if fmt not in FORMATS:
        raise _refuse(f"format {fmt!r}: adaptools reads {', '.join(FORMATS)}", f"quantization_config.{name}")
    kind, bits = args.get("type", "int"), int(args.get("num_bits", 8))
    strategy = args.get("strategy") or ("group" if (args.get("group_size") or 0) > 0 else
                                        "channel" if args.get("group_size") == -1 else "tensor")
    if fmt == NVFP4:
        if (kind, bits, strategy, args.get("group_size")) != ("float", 4, "tensor_group", 16) or not args.get(
                "symmetric", True) or args.get("scale_dtype") not in (None, "torch.float8_e4m3fn"):
            raise _refuse(f"{fmt} other than symmetric fp4 in groups of 16 with fp8 scales and a global scale",
                          f"quantization_config.{name}")
        return Scheme(fmt, 4, "float", "tensor_group", True, 16)
    if strategy not in ("tensor", "channel", "group", "block"):
        raise _refuse(f"weight strategy {strategy!r} is not read", f"quantization_config.{name}")
    if (fmt == "float-quantized") != (kind == "float") or (kind == "float" and bits != 8) or (
            fmt == "int-quantized" and bits != 8):
        raise _refuse(f"{bits}-bit {kind} weights in {fmt}", f"quantization_config.{name}")
    if strategy == "group" and not (args.get("group_size") or 0) > 0:
        raise _refuse("group strategy without a positive group_size", f"quantization_config.{name}")
    if strategy == "block" and not args.get("block_structure"):
        raise _refuse("block strategy without block_structure", f"quantization_config.{name}")
    if kind == "float" and not args.get("symmetric", True):
        raise _refuse("asymmetric float weights", f"quantization_config.{name}")
    block = tuple(args.get("block_structure") or (0, 0))
    return Scheme(fmt, bits, kind, strategy, bool(args.get("symmetric", True)),
                  int(args.get("group_size") or 0) if strategy == "group" else 0, (int(block[0]), int(block[1])))


def _matches(module: str, target: str, field: str) -> bool:
    """compressed-tensors' rule: ``re:PATTERN`` matches from the start of the module's name, a plain target
    the whole name; a target naming a class (``Linear``) is taken to match every quantized module. The
    pattern comes from the file: one that is invalid or backtracks past a time limit is refused naming
    ``field`` (adaptools.patterns), not raised as ``re.error`` nor left to hang."""
    if target.startswith("re:"):
        try:
            return plugin.match_pattern(target[3:], module, field=f"quantization_config.{field}") is not None
        except InputError as exc:
            raise InputError(exc.message, hint=HINT) from None
    return target == module or ("." not in target and target[:1].isupper())


def _ignored(quant: Mapping[str, Any], module: str) -> bool:
    return any(_matches(module, t, "ignore") and (t.startswith("re:") or t == module)
               for t in quant.get("ignore") or [])


def scheme_for(quant: Mapping[str, Any], module: str) -> Scheme | None:
    """The scheme the config gives ``module`` (the first group targeting it), or None when no group does or
    the ``ignore`` list names it."""
    if _ignored(quant, module):
        return None
    for key, group in quant["config_groups"].items():
        if any(_matches(module, t, f"config_groups.{key}.targets") for t in group["targets"]):
            return _scheme(f"config_groups.{key}", group, quant.get("format"))
    return None


def schemes_of(quant: Mapping[str, Any], modules: list[str]) -> dict[str, Scheme]:
    """``{module: Scheme}`` for each stored quantized module: the first config group targeting it (as the
    library applies them); a module no group claims, or one the ``ignore`` list names, is refused."""
    groups = []
    for key, group in quant["config_groups"].items():
        scheme = _scheme(f"config_groups.{key}", group, quant.get("format"))
        if scheme is not None:
            groups.append((f"config_groups.{key}.targets", group["targets"], scheme))
    found = {}
    for module in modules:
        scheme = next((s for field, targets, s in groups if any(_matches(module, t, field) for t in targets)), None)
        if scheme is None or _ignored(quant, module):
            raise _refuse("quantized tensors for a module no config group of quantization_config targets",
                          module)
        found[module] = scheme
    return found


def _expect(tensor: BaseTensor | None, name: str, dtypes: tuple[str, ...], shape: tuple[int, ...] | None,
            what: str) -> BaseTensor:
    if tensor is None:
        raise _refuse(f"missing: a {what} needs it", name)
    if tensor.dtype not in dtypes or (shape is not None and tuple(tensor.shape) != shape):
        want = "/".join(dtypes) + (f" {list(shape)}" if shape is not None else "")
        raise _refuse(f"{tensor.dtype} {list(tensor.shape)}; a {what} stores {want} here", name)
    return tensor


def scale_shape(scheme: Scheme, shape: tuple[int, int]) -> tuple[int, ...]:
    rows, cols = shape
    if scheme.strategy == "tensor":
        return (1,)
    if scheme.strategy == "channel":
        return (rows, 1)
    if scheme.strategy in ("group", "tensor_group"):
        return (rows, cols // scheme.group_size)
    return (-(-rows // scheme.block[0]), -(-cols // scheme.block[1]))


def packed_zero_shape(scheme: Scheme, shape: tuple[int, int]) -> tuple[int, ...]:
    """The zero point's stored shape: packed along the rows for group and channel strategies."""
    scales = scale_shape(scheme, shape)
    if scheme.format == "pack-quantized" and scheme.strategy in ("group", "channel"):
        return (math.ceil(shape[0] * scheme.bits / 32), scales[1])
    return scales


def group_names(module: str, scheme: Scheme) -> tuple[str, ...]:
    """The stored tensors of a module's weight, the one the dense weight replaces first."""
    names = [f"{module}.weight_packed", f"{module}.weight_shape"] if scheme.format == "pack-quantized" else []
    if scheme.format == NVFP4:
        names = [f"{module}.weight_packed", f"{module}.weight_global_scale", f"{module}.input_global_scale"]
    names.append(f"{module}.weight_scale")
    if not scheme.symmetric:
        names.append(f"{module}.weight_zero_point")
    return tuple(names)


def checked(module: str, scheme: Scheme, tensors: Mapping[str, BaseTensor], shape: tuple[int, int]) -> Layout:
    """The layout of ``module``'s weight of dense ``shape``, every companion's dtype and shape checked."""
    what = f"{scheme.format} {scheme.strategy} weight"
    anchor = f"{module}.weight_packed" if scheme.format in PACKED else f"{module}.weight"
    if scheme.group_size and shape[1] % scheme.group_size:
        raise _refuse(f"{shape[1]} columns are no whole number of groups of {scheme.group_size}", anchor)
    scale = _expect(tensors.get(f"{module}.weight_scale"), f"{module}.weight_scale",
                    ("F8_E4M3",) if scheme.format == NVFP4 else tuple(SCALE_TYPES), scale_shape(scheme, shape), what)
    if scheme.format == NVFP4:
        names = [n for n in group_names(module, scheme) if not n.endswith(".input_global_scale") or n in tensors]
        for name in names[1:-1]:
            _expect(tensors.get(name), name, ("F32",), (1,), what)
        return Layout(scheme, shape, "BF16", tuple(names))  # the library decodes fp4 to bf16
    zero = f"{module}.weight_zero_point"
    if not scheme.symmetric:
        packed = scheme.format == "pack-quantized" and scheme.strategy in ("group", "channel")  # PACK_ZP_STRATS
        dtype = ("I32",) if packed else ("I8",)
        _expect(tensors.get(zero), zero, dtype, packed_zero_shape(scheme, shape), what)
    elif zero in tensors:
        raise _refuse("a zero point for a symmetric scheme", zero)
    if f"{module}.weight_g_idx" in tensors:
        raise _refuse("act-order group indices (g_idx) are not read: compressed-tensors itself no longer reads "
                      "them", f"{module}.weight_g_idx")
    return Layout(scheme, shape, scale.dtype, group_names(module, scheme))


def scan(tensors: Mapping[str, BaseTensor], config: Mapping[str, Any], fmt: str) -> dict[str, Layout] | None:
    """``{M.weight: Layout}`` for every weight stored in format ``fmt`` (None: not a compressed-tensors
    checkpoint), headers and config checked; InputError naming the tensor for anything adaptools would misread.
    A pack-quantized weight's columns are known only once its ``weight_shape`` is read (:func:`packed_layout`):
    until then its layout holds the most columns the packed width allows, unchecked."""
    quant = ct_config(config)
    if quant is None:
        return None
    for name in tensors:
        module, _, param = name.rpartition(".")
        if param in ACTIVATION_PARAMS and not (  # NVFP4's activation global scale belongs to its weight
                param == "input_global_scale" and f"{module}.weight_global_scale" in tensors):
            raise _refuse("a static activation parameter: only dynamic-activation checkpoints are read", name)
    modules = sorted({n.rpartition(".")[0] for n in tensors
                      if n.endswith((".weight_packed", ".weight_scale", ".weight_shape", ".weight_zero_point"))})
    layouts: dict[str, Layout] = {}
    for module, scheme in schemes_of(quant, modules).items():
        if scheme.format != fmt:
            continue
        if fmt in PACKED and f"{module}.weight" in tensors:
            raise _refuse(f"a dense tensor beside the {fmt} {module}.weight_packed: which is the weight is "
                          "ambiguous", f"{module}.weight")
        if fmt == "pack-quantized":
            packed = f"{module}.weight_packed"
            stored = _expect(tensors.get(packed), packed, ("I32",), None, f"{fmt} weight")
            _expect(tensors.get(f"{module}.weight_shape"), f"{module}.weight_shape", ("I64", "I32"), (2,),
                    f"{fmt} weight")
            if len(stored.shape) != 2:
                raise _refuse(f"{list(stored.shape)}: a packed weight is 2-D", packed)
            names = group_names(module, scheme)
            for name in names:
                if name not in tensors:
                    raise _refuse(f"missing: a {fmt} {scheme.strategy} weight needs it", name)
            layouts[f"{module}.weight"] = Layout(scheme, (stored.shape[0], stored.shape[1] * 32 // scheme.bits),
                                                 "", names)
            continue
        if fmt == NVFP4:
            packed = f"{module}.weight_packed"
            stored = _expect(tensors.get(packed), packed, ("U8",), None, f"{fmt} weight")
            if len(stored.shape) != 2:
                raise _refuse(f"{list(stored.shape)}: a packed weight is 2-D", packed)
            layouts[f"{module}.weight"] = checked(module, scheme, tensors, (stored.shape[0], stored.shape[1] * 2))
            continue
        weight = f"{module}.weight"
        stored = _expect(tensors.get(weight), weight, ("F8_E4M3" if fmt == "float-quantized" else "I8",), None,
                         f"{fmt} weight")
        if len(stored.shape) != 2:
            raise _refuse(f"{list(stored.shape)}: only 2-D weights are read", weight)
        layouts[weight] = checked(module, scheme, tensors, (stored.shape[0], stored.shape[1]))
    return layouts


def packed_layout(module: str, layout: Layout, tensors: Mapping[str, BaseTensor], shape: list[int]) -> Layout:
    """A pack-quantized weight's layout once its ``weight_shape`` has been read: it must name the packed
    rows and a width the packed words hold exactly (``weight_shape`` lies otherwise)."""
    rows, width = layout.shape[0], tensors[f"{module}.weight_packed"].shape[1]
    if len(shape) != 2 or shape[0] != rows or not 1 <= shape[1] or math.ceil(
            shape[1] * layout.scheme.bits / 32) != width:
        raise _refuse(f"weight_shape says {shape}, but the packed weight holds {rows} rows of {width} int32 words "
                      f"of {layout.scheme.bits}-bit values", f"{module}.weight_shape")
    return checked(module, layout.scheme, tensors, (shape[0], shape[1]))
