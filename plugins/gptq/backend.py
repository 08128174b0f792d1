"""The GPTQ backends: a checkpoint's packed linears (``qweight``, ``qzeros``, ``scales``, ``g_idx``) seen as dense
``weight`` parameters, decoded as GPTQModel's dequantizer decodes them, and re-encoded for ``--requantize`` onto
the grid they are stored on (docs/gptq.md).

Two backends, one per ``checkpoint_format``: ``gptq`` stores each zero point minus one, ``gptq_v2`` does not, and
the stored tensors cannot tell which (config.json can, and only the backend of the checkpoint's format claims its
groups, as MXFP4 does with its dtype). Everything else a decode needs (bits, shapes) follows from the stored
shapes, so a weight decodes the same however it is read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from adaptools import plugin
from adaptools.plugin import BaseTensor, InputError, UnsupportedOperationError

from .codec import dequantize, quantize, zero_points
from .layout import FORMATS, HINT, Layout, checkpoint_format, gptq_config, scan

NAMES = {True: "gptq", False: "gptq_v2"}
DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
REQUANTIZE_NOTE = ("gptq --requantize rounds each merged weight to the nearest point of its stored grid (scales, "
                   "zero points and g_idx kept): this is not GPTQ, which calibrates on data (docs/gptq.md)")


def _bits(qweight: torch.Tensor, g_idx: torch.Tensor) -> int:
    """The code width the shapes say: ``in * bits / 32`` packed rows for ``in`` inputs."""
    rows, inputs = qweight.shape[0], g_idx.shape[0]
    bits = rows * 32 // inputs if inputs else 0
    if bits not in (2, 3, 4, 8) or inputs * bits != rows * 32:
        raise InputError(f"{rows} packed rows for {inputs} inputs is no GPTQ code width", tensor="qweight", hint=HINT)
    return bits


def check_parts(module: str, scales: torch.Tensor, g_idx: torch.Tensor, groups: int) -> None:
    """What the headers cannot show: scales finite and positive, every ``g_idx`` a group that exists."""
    values = scales.to(torch.float32)
    if not bool((torch.isfinite(values) & (values > 0)).all()):
        raise InputError("scales with NaN, Inf, zero or negative values", tensor=f"{module}.scales", hint=HINT)
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise InputError(f"group indices outside 0..{groups - 1}", tensor=f"{module}.g_idx", hint=HINT)


class Gptq(plugin.Backend):
    """GPTQ linears of a checkpoint whose ``checkpoint_format`` stores zero points minus one (``v1``) or not."""

    requantize_note = REQUANTIZE_NOTE

    def __init__(self, v1: bool):
        self.v1 = v1
        self.name = NAMES[v1]  # type: ignore[misc]
        self.description = (  # type: ignore[misc]
            f"GPTQ checkpoint_format {NAMES[v1]} (2/3/4/8-bit codes in int32, group scales and zero points, g_idx): "
            "GPTQModel's dequantization bit for bit; --requantize rounds onto the stored grid")
        self._last: dict[str, Layout] = {}

    @property
    def implementation(self) -> str:
        return f"{plugin.describe_packed()}: GPTQModel's (q - z) * s in fp32, rounded once to the scales' dtype"

    def find_groups(self, tensors: Mapping[str, BaseTensor]) -> dict[str, list[str]]:
        """``M.weight`` -> ``[M.qweight, M.qzeros, M.scales, M.g_idx]`` for every GPTQ linear of a checkpoint in
        this backend's format (layout.scan)."""
        layouts = scan(tensors, getattr(tensors, "config", None) or {}, self.v1)
        self._last.update(layouts)
        return {param: list(layout.names) for param, layout in layouts.items()}

    def group_info(self, param: str, read: Callable[[str], torch.Tensor]) -> tuple[torch.dtype, tuple[int, ...]]:
        """The scales' dtype and ``(out, in)``, the small parts read and checked (scales, g_idx)."""
        layout = self._last[param]
        module = param.removesuffix(".weight")
        check_parts(module, read(f"{module}.scales"), read(f"{module}.g_idx"), layout.groups)
        return DTYPES[layout.scale_dtype], layout.shape

    def _parts(self, param: str, read: Callable[[str], torch.Tensor]) -> tuple[torch.Tensor, ...]:
        module = param.removesuffix(".weight")
        qweight, qzeros = read(f"{module}.qweight"), read(f"{module}.qzeros")
        scales, g_idx = read(f"{module}.scales"), read(f"{module}.g_idx")
        try:
            bits = _bits(qweight, g_idx)
        except InputError as exc:
            raise InputError(exc.message, tensor=f"{module}.qweight", hint=HINT) from None
        groups = scales.shape[0]
        if (qweight.dtype, qzeros.dtype, g_idx.dtype) != (torch.int32,) * 3 or scales.dtype not in DTYPES.values() \
                or tuple(qweight.shape) != (g_idx.shape[0] * bits // 32, scales.shape[1]) \
                or tuple(qzeros.shape) != (groups, scales.shape[1] * bits // 32):
            raise InputError(f"qweight {list(qweight.shape)}, qzeros {list(qzeros.shape)}, scales "
                             f"{list(scales.shape)} and g_idx {list(g_idx.shape)} disagree", tensor=f"{module}.qweight",
                             hint=HINT)
        check_parts(module, scales, g_idx, groups)
        return qweight, zero_points(qzeros, bits, self.v1), scales, g_idx, torch.tensor(bits)

    def decode_group(self, param: str, read: Callable[[str], torch.Tensor], names: list[str],
                     settings: Mapping[str, Any] | None = None) -> torch.Tensor:
        """The weight as GPTQModel dequantizes it (settings, when given, are the stored grid it was just encoded
        on: the same tensors, so the same decode)."""
        qweight, zeros, scales, g_idx, bits = self._parts(param, read)
        return dequantize(qweight, zeros, scales, g_idx, int(bits))

    def group_settings(self, param: str, read: Callable[[str], torch.Tensor]) -> dict[str, Any]:
        """The stored grid: qzeros, scales and g_idx as stored (written back unchanged) and the zero points."""
        module = param.removesuffix(".weight")
        qweight, zeros, scales, g_idx, bits = self._parts(param, read)
        return {"module": module, "bits": int(bits), "zeros": zeros, "qzeros": read(f"{module}.qzeros"),
                "scales": scales, "g_idx": g_idx}

    def encode_group(self, param: str, dense: torch.Tensor, settings: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``qweight`` re-encoded from ``dense`` on the stored grid; qzeros, scales and g_idx as stored."""
        module = settings["module"]
        if not bool(torch.isfinite(dense).all()):
            raise InputError("holds NaN or Inf values, which GPTQ codes cannot store", tensor=param,
                             hint="merge into a dense output instead (leave out --requantize)")
        qweight = quantize(dense, settings["zeros"], settings["scales"], settings["g_idx"], settings["bits"])
        return {f"{module}.qweight": qweight, f"{module}.qzeros": settings["qzeros"].clone(),
                f"{module}.scales": settings["scales"].clone(), f"{module}.g_idx": settings["g_idx"].clone()}

    def quantize_options(self, config: Mapping[str, Any]) -> Any:
        """A GPTQ base of this backend's format is one this backend "made", so that ``merge --merge-base original
        --requantize`` reaches :meth:`quantize_settings` and its refusal, rather than a vaguer one."""
        quant = gptq_config({"quantization_config": config})
        if quant is None or FORMATS[checkpoint_format(quant)] != self.v1:
            return None
        return plugin.QuantizeOptions(quant_type=self.name)

    def quantize_settings(self, tensor: BaseTensor, options: Any) -> dict[str, Any]:
        raise UnsupportedOperationError(
            "adaptools does not quantize dense weights to GPTQ: that needs GPTQ's calibration on data",
            hint="quantize with GPTQModel; adaptools merges into GPTQ bases (merge --requantize keeps their grid)")
