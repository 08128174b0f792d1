"""The AWQ backend: a checkpoint's GEMM-packed linears (``M.qweight`` + ``M.qzeros`` + ``M.scales``) seen as dense
fp16 ``M.weight`` parameters, decoded as AutoAWQ's ``dequantize_gemm`` decodes them (docs/awq.md).

``--requantize`` keeps each changed linear's stored ``scales`` and ``qzeros`` and re-encodes only ``qweight``: the
merged weight rounded onto the grid the checkpoint already has. That is not AWQ: AWQ chooses its scales from
activation statistics, which a merge does not have (docs/awq.md, "Re-encoding"). A dense weight is never
quantized to AWQ (``--merge-base original --requantize``, ``adaptools requantize``): there is no grid to keep.

Everything a group needs is in its own three tensors (the group size is ``in / scales rows``, checked against
config.json when the checkpoint is scanned), so decoding needs no state kept between hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from adaptools import plugin
from adaptools.plugin import BaseTensor, InputError, UnsupportedOperationError

from .codec import PACK, dequantize, quantize
from .layout import HINT, QWEIGHT, QZEROS, SCALES, scan

REQUANTIZE_NOTE = ("awq --requantize rounds each merged weight to the nearest point of its stored grid (scales "
                   "and zero points kept): this is not AWQ, which chooses its scales from calibration activations "
                   "(docs/awq.md)")
NO_QUANTIZER = ("adaptools does not quantize dense weights to AWQ: AWQ chooses its scales from calibration "
                "activations, which adaptools does not have")
NO_QUANTIZER_HINT = ("merge onto the AWQ base itself with --requantize (keeps its scales and zeros), or quantize "
                     "the dense merge with AutoAWQ")


def _module(param: str) -> str:
    return param.removesuffix(".weight")


def check_scales(scales: torch.Tensor, name: str) -> None:
    """Scales must be finite and positive: AutoAWQ makes them from a clamped range (never zero), and a zero,
    NaN or infinite scale decodes to garbage and cannot be re-encoded onto."""
    values = scales.to(torch.float32)
    bad = int((~(torch.isfinite(values) & (values > 0))).sum())
    if bad:
        raise InputError(f"{bad} scale(s) NaN, infinite, zero or negative", tensor=name, hint=HINT)


class Awq(plugin.Backend):
    """AWQ GEMM linears (4-bit, zero points, fp16 scales per group of inputs)."""

    name = "awq"
    requantize_note = REQUANTIZE_NOTE
    description = ("AWQ GEMM (4-bit, zero points, fp16 group scales; AutoAWQ/transformers): AutoAWQ's "
                   "dequantize_gemm, bit for bit; --requantize onto the stored grid (not AWQ calibration)")

    def __init__(self) -> None:
        #: The dense ``(out, in)`` of each linear of the checkpoint scanned last: the checkpoint asks
        #: :meth:`group_info` right after :meth:`find_groups`, and the shapes come from the headers, so the
        #: large qweight need not be read to answer it.
        self._shapes: dict[str, tuple[int, int]] = {}

    @property
    def implementation(self) -> str:
        return f"{plugin.describe_packed()}: AutoAWQ's (q - z) * s, the fp32 product rounded once to fp16"

    def find_groups(self, tensors: Mapping[str, BaseTensor]) -> dict[str, list[str]]:
        """``M.weight`` -> ``[M.qweight, M.qzeros, M.scales]`` for every AWQ linear (layout.scan)."""
        found = scan(tensors, getattr(tensors, "config", None) or {})
        if not found:
            return {}
        self._shapes = found
        return {param: [_module(param) + part for part in (QWEIGHT, QZEROS, SCALES)] for param in found}

    def group_info(self, param: str, read: Callable[[str], torch.Tensor]) -> tuple[torch.dtype, tuple[int, ...]]:
        """fp16 ``[out, in]`` from the scanned headers (else from the qweight itself); reads and checks the
        scales."""
        scales = read(_module(param) + SCALES)
        check_scales(scales, _module(param) + SCALES)
        shape = self._shapes.get(param) or (int(scales.shape[1]), int(read(_module(param) + QWEIGHT).shape[0]))
        return torch.float16, shape

    def _parts(self, param: str, read: Callable[[str], torch.Tensor]) -> tuple[torch.Tensor, ...]:
        module = _module(param)
        qweight, qzeros, scales = (read(module + part) for part in (QWEIGHT, QZEROS, SCALES))
        rows, width = qweight.shape
        if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32 or scales.dtype != torch.float16 or \
                scales.dim() != 2 or scales.shape[1] != width * PACK or rows % scales.shape[0] or \
                tuple(qzeros.shape) != (scales.shape[0], width):
            raise InputError(f"AWQ tensors qweight {qweight.dtype} {list(qweight.shape)}, qzeros {qzeros.dtype} "
                             f"{list(qzeros.shape)}, scales {scales.dtype} {list(scales.shape)} do not fit together",
                             tensor=module + QWEIGHT, hint=HINT)
        check_scales(scales, module + SCALES)
        return qweight, qzeros, scales

    def decode_group(self, param: str, read: Callable[[str], torch.Tensor], names: list[str],
                     settings: Mapping[str, Any] | None = None) -> torch.Tensor:
        """The weight as AutoAWQ dequantizes it (fp16 ``[out, in]``); ``settings`` add nothing (the three
        tensors describe themselves)."""
        qweight, qzeros, scales = self._parts(param, read)
        return dequantize(qweight, qzeros, scales, qweight.shape[0] // scales.shape[0])

    def group_settings(self, param: str, read: Callable[[str], torch.Tensor]) -> dict[str, Any]:
        """The stored grid a changed weight is rounded onto: its ``qzeros`` and ``scales``, kept as stored."""
        _, qzeros, scales = self._parts(param, read)
        return {"qzeros": qzeros, "scales": scales}

    def encode_group(self, param: str, dense: torch.Tensor, settings: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """A new ``qweight`` for ``dense`` on the stored grid, with the stored ``qzeros`` and ``scales``."""
        module = _module(param)
        qzeros, scales = settings["qzeros"], settings["scales"]
        if dense.dim() != 2 or dense.shape[0] != scales.shape[1] or dense.shape[1] % scales.shape[0]:
            raise InputError(f"a {list(dense.shape)} weight cannot be stored on this linear's AWQ grid "
                             f"({list(scales.shape)} scales)", tensor=param, hint="merge into a dense output")
        if not bool(torch.isfinite(dense).all()):
            raise InputError("holds NaN or infinite values, which AWQ cannot store", tensor=param,
                             hint="merge into a dense output (leave out --requantize)")
        qweight = quantize(dense, qzeros, scales, dense.shape[1] // scales.shape[0])
        return {module + QWEIGHT: qweight, module + QZEROS: qzeros.clone(), module + SCALES: scales.clone()}

    def quantize_settings(self, tensor: BaseTensor, options: Any) -> dict[str, Any]:
        raise UnsupportedOperationError(NO_QUANTIZER, tensor=tensor.name, hint=NO_QUANTIZER_HINT)
