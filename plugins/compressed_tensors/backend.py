"""The compressed-tensors backends: a checkpoint's compressed weights seen as dense parameters, decoded as the
compressed-tensors library decompresses them and, for the round-to-nearest formats, encoded back byte for byte as
its compressor does (docs/compressed-tensors.md).

One backend per storage format (``pack-quantized``, ``float-quantized``, ``int-quantized``,
``nvfp4-pack-quantized``); a checkpoint mixing
formats (``mixed-precision``) has its weights claimed by each. A weight's scheme comes from config.json's
``config_groups``, which the decoding hooks do not see: as for FP8, the scan of a checkpoint is tied to that
checkpoint's reader, and a weight read any other way gets the layout every scan agrees on, or is refused.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from adaptools import plugin
from adaptools.plugin import BaseTensor, InputError

from .codec import (
    FP8,
    dequantize,
    dequantize_nvfp4,
    nvfp4_qparams,
    padding_is_zero,
    qparams,
    quantize,
    quantize_nvfp4,
)
from .layout import HINT, NVFP4, PACKED, Layout, ct_config, group_names, packed_layout, scan, scheme_for

NAMES = {"pack-quantized": "ct_pack", "float-quantized": "ct_fp8", "int-quantized": "ct_int8",
         "nvfp4-pack-quantized": "ct_nvfp4"}
DESCRIPTIONS = {
    "pack-quantized": "compressed-tensors pack-quantized (int4/int8 packed in int32, group/channel scales, "
                      "zero points): the library's decompression, bit for bit",
    "float-quantized": "compressed-tensors float-quantized (fp8 e4m3, tensor/channel/block scales): the "
                       "library's decompression, byte-exact --requantize",
    "int-quantized": "compressed-tensors int-quantized (int8 unpacked): the library's decompression, byte-exact "
                     "--requantize",
    "nvfp4-pack-quantized": "compressed-tensors nvfp4-pack-quantized (fp4 e2m1, fp8 scales per 16, a global "
                            "scale): the library's decompression, byte-exact --requantize",
}
#: Formats whose weights are round-to-nearest from their own minima and maxima (no calibration data), so that
#: ``--requantize`` can make what the library makes. Packed int checkpoints come from GPTQ-style calibration.
REQUANTIZABLE = ("float-quantized", "int-quantized", "nvfp4-pack-quantized")
DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


@dataclass(frozen=True)
class CtOptions(plugin.QuantizeOptions):
    """``QuantizeOptions`` carrying a compressed-tensors base's whole ``quantization_config``: the schemes a
    ``--merge-base original --requantize`` output is encoded in, and the config it is written with."""

    config: dict[str, Any] | None = field(default=None, compare=False)


def check_scales(scale: torch.Tensor, name: str) -> None:
    """Scales must be finite and positive: the library replaces a zero scale by its dtype's eps."""
    values = scale.to(torch.float32)
    if not bool((torch.isfinite(values) & (values > 0)).all()):
        raise InputError("scales with NaN, Inf, zero or negative values", tensor=name, hint=HINT)


class CompressedTensors(plugin.Backend):
    """compressed-tensors weights stored in format ``fmt``."""

    def __init__(self, fmt: str):
        self.format = fmt
        self.name = NAMES[fmt]  # type: ignore[misc]
        self.description = DESCRIPTIONS[fmt]  # type: ignore[misc]
        self._last: dict[str, Layout] = {}
        self._headers: Mapping[str, BaseTensor] = {}
        self._owned: weakref.WeakKeyDictionary[Any, dict[str, Layout]] = weakref.WeakKeyDictionary()
        self._seen: dict[str, set[Layout]] = {}

    @property
    def implementation(self) -> str:
        if self.format == "pack-quantized":  # group and channel scales; a tensor or block strategy runs in torch
            return f"{plugin.describe_packed()}: the library's (q - zp) * scale in the scale's dtype"
        return "torch (a few rows at a time)"

    def find_groups(self, tensors: Mapping[str, BaseTensor]) -> dict[str, list[str]]:
        """``M.weight`` -> its stored tensors, for every weight of this format (layout.scan)."""
        layouts = scan(tensors, getattr(tensors, "config", None) or {}, self.format)
        if not layouts:
            return {}
        self._last, self._headers = layouts, tensors
        return {param: list(layout.names) for param, layout in layouts.items()}

    def _layouts(self, read: Callable[[str], torch.Tensor]) -> dict[str, Layout]:
        owner = getattr(read, "__self__", None)  # a bound reader: the checkpoint itself
        try:
            return self._owned.get(owner, {}) if owner is not None else {}
        except TypeError:
            return {}

    def _layout(self, param: str, read: Callable[[str], torch.Tensor]) -> Layout:
        layout = self._layouts(read).get(param)
        if layout is not None:
            return layout
        seen = self._seen.get(param, set())
        if len(seen) != 1:
            why = "no compressed-tensors checkpoint opened holds it" if not seen else (
                "checkpoints opened in this process store it differently")
            raise InputError(f"cannot tell this weight's scheme: {why}", tensor=param,
                             hint="read it through the adaptools.Checkpoint that holds it")
        return next(iter(seen))

    def group_info(self, param: str, read: Callable[[str], torch.Tensor]) -> tuple[torch.dtype, tuple[int, ...]]:
        """The dense dtype (the scale's, as the library decompresses) and shape; reads the small tensors: a
        packed weight's ``weight_shape`` (checked against the packed width) and the scales (checked)."""
        layout = self._last[param]
        module = param.removesuffix(".weight")
        if layout.scheme.format == "pack-quantized":
            stored = read(f"{module}.weight_shape")
            layout = packed_layout(module, layout, self._headers, [int(v) for v in stored.tolist()])
            self._last[param] = layout
        for name in layout.names:
            if name.endswith(("weight_scale", "weight_global_scale")):
                check_scales(read(name), name)
        owner = getattr(read, "__self__", None)
        if owner is not None:
            try:
                self._owned.setdefault(owner, {})[param] = layout
            except TypeError:
                pass
        self._seen.setdefault(param, set()).add(layout)
        return DTYPES[layout.scale_dtype], layout.shape

    def decode_group(self, param: str, read: Callable[[str], torch.Tensor], names: list[str],
                     settings: Mapping[str, Any] | None = None) -> torch.Tensor:
        """The weight as the library decompresses it; with ``settings`` (a group just encoded with them)
        their layout, else the layout of the checkpoint ``read`` reads."""
        if settings is not None and settings.get("dense"):
            return read(param).to(DTYPES[settings["dtype"]])
        layout = settings["layout"] if settings is not None else self._layout(param, read)
        module = param.removesuffix(".weight")
        anchor = f"{module}.weight_packed" if layout.scheme.format in PACKED else param
        weight, scale = read(anchor), read(f"{module}.weight_scale")
        check_scales(scale, f"{module}.weight_scale")
        if layout.scheme.format == NVFP4:
            glob = read(f"{module}.weight_global_scale")
            check_scales(glob, f"{module}.weight_global_scale")
            return self._finite(param, dequantize_nvfp4(weight, scale, glob), layout)
        zero = read(f"{module}.weight_zero_point") if not layout.scheme.symmetric else None
        if zero is not None and zero.dtype != torch.int32:  # unpacked: the library clamps them to the bits' range
            low, high = -(1 << (layout.scheme.bits - 1)), (1 << (layout.scheme.bits - 1)) - 1
            if bool(((zero < low) | (zero > high)).any()):
                raise InputError(f"zero points outside {low} to {high}, the range of {layout.scheme.bits}-bit "
                                 "values", tensor=f"{module}.weight_zero_point", hint=HINT)
        if layout.scheme.format == "pack-quantized" and not padding_is_zero(weight, layout):
            raise InputError(f"weight_shape says {layout.shape[1]} columns, but the packed rows hold values beyond "
                             "them", tensor=f"{module}.weight_shape", hint=HINT)
        return self._finite(param, dequantize(layout, weight, scale, zero, DTYPES[layout.scale_dtype]), layout)

    @staticmethod
    def _finite(param: str, dense: torch.Tensor, layout: Layout) -> torch.Tensor:
        bad = plugin.count_nonfinite(dense)
        if bad:
            raise InputError(f"decodes to {bad} NaN or infinite value(s): fp8 NaN codes, or scales too large for "
                             f"{layout.scale_dtype}", tensor=param, hint=HINT)
        return dense

    def group_settings(self, param: str, read: Callable[[str], torch.Tensor]) -> dict[str, Any]:
        """The layout to encode a changed weight in; refused for packed weights (calibrated, see
        :data:`REQUANTIZABLE`)."""
        layout = self._layout(param, read)
        if layout.scheme.format not in REQUANTIZABLE:
            why = "these come from calibrated (GPTQ-style) quantization, which rounding to nearest would not reproduce"
            raise InputError(f"--requantize into {layout.scheme.format} weights: {why}", tensor=param,
                             hint="merge into a dense output (leave out --requantize)")
        settings: dict[str, Any] = {"layout": layout}
        kept = f"{param.removesuffix('.weight')}.input_global_scale"  # not the weight's: carried unchanged
        if kept in layout.names:  # written as it is: a NaN or a negative scale would reach the output
            settings["input_global_scale"] = read(kept)
            check_scales(settings["input_global_scale"], kept)
        return settings

    def encode_group(self, param: str, dense: torch.Tensor, settings: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The stored tensors as the library's compressor makes them from ``dense``: scales and zero points
        by ``calculate_qparams`` from its minima and maxima, then ``quantize``."""
        if settings.get("dense"):
            return {param: dense.clone()}  # a copy: the engine reuses the buffer it passed in
        layout: Layout = settings["layout"]
        module = param.removesuffix(".weight")
        weight = dense.to(DTYPES[layout.scale_dtype])
        if not bool(torch.isfinite(weight).all()):
            raise InputError(f"holds NaN or Inf values, which {layout.scheme.format} cannot store", tensor=param,
                             hint="merge into a 16-bit output instead")
        if layout.scheme.format == NVFP4:
            scales, glob = nvfp4_qparams(weight)
            out = {f"{module}.weight_packed": quantize_nvfp4(weight, scales, glob),
                   f"{module}.weight_global_scale": glob, f"{module}.weight_scale": scales.to(FP8)}
            if "input_global_scale" in settings:
                out[f"{module}.input_global_scale"] = settings["input_global_scale"].clone()
            return out
        scale, zero = qparams(weight, layout.scheme)
        out = {param: quantize(weight, scale, zero, layout.scheme), f"{module}.weight_scale": scale}
        if not layout.scheme.symmetric:
            out[f"{module}.weight_zero_point"] = zero
        return out

    def quantize_settings(self, tensor: BaseTensor, options: Any) -> dict[str, Any]:
        """How ``--merge-base original --requantize`` encodes a dense weight of the original: in the scheme the
        quantized base's config gives its module; left dense when no group of this format claims it."""
        quant = options.config if isinstance(options, CtOptions) else None
        if quant is None:
            raise InputError(f"{self.name} encodes weights only in the schemes of a compressed-tensors base",
                             hint="use merge --merge-base original --requantize with that base as BASE")
        module = tensor.name.removesuffix(".weight")
        scheme = scheme_for(quant, module)
        if scheme is None or scheme.format != self.format or len(tensor.shape) != 2 or (
                scheme.strategy == "group" and tensor.shape[1] % scheme.group_size):
            return {"dense": True, "dtype": tensor.dtype}
        shape = (tensor.shape[0], tensor.shape[1])
        return {"layout": Layout(scheme, shape, tensor.dtype, group_names(module, scheme))}

    def quantization_config(self, settings: Mapping[str, Any], options: Any) -> dict[str, Any]:
        """The quantized base's own ``quantization_config``."""
        if not isinstance(options, CtOptions) or options.config is None:
            raise InputError(f"{self.name} writes only the quantization_config of a compressed-tensors base")
        return dict(options.config)

    def quantize_options(self, config: Mapping[str, Any]) -> Any:
        """The options of a compressed-tensors base whose every scheme is this backend's format (and can be
        re-encoded); None otherwise."""
        quant = ct_config({"quantization_config": config})
        if quant is None or self.format not in ("float-quantized", "int-quantized"):  # NVFP4: not yet
            return None
        formats = {group.get("format") or quant.get("format") for group in quant["config_groups"].values()
                   if group.get("weights")}
        if formats != {self.format}:
            return None
        return CtOptions(quant_type=self.name, config=dict(quant))
