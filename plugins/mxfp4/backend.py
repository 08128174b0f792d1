"""The MXFP4 backends: a checkpoint's packed expert parameters (``P_blocks`` + ``P_scales``) seen as dense
parameters, decoded as transformers decodes gpt-oss (docs/mxfp4.md).

The dense dtype is the model's (config.json's ``dtype``), which the group's own tensors do not say, so one
backend is registered per dense dtype and only the one matching the checkpoint claims its groups. Encoding is
refused: transformers' MXFP4 quantizer runs triton kernels on a GPU and no reference quantizer runs on the
CPU, so a requantized expert could not be proved byte for byte (docs/mxfp4.md, "Requantizing").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from adaptools import plugin
from adaptools.plugin import BaseTensor, InputError, UnsupportedOperationError

from .codec import dense_shape, dequantize
from .layout import BLOCKS, HINT, SCALES, model_dtype, scan

NAMES = {"BF16": "mxfp4", "F16": "mxfp4_fp16", "F32": "mxfp4_fp32"}
NO_QUANTIZER = ("no reference MXFP4 quantizer runs on the CPU (transformers quantizes gpt-oss with triton kernels "
                "on a GPU), so adaptools does not write MXFP4")
NO_QUANTIZER_HINT = ("merge without --requantize writes the dense model transformers dequantizes to; quantize that "
                     "with transformers on a GPU")


class Mxfp4(plugin.Backend):
    """MXFP4 expert parameters in a checkpoint whose dense dtype is ``dense`` (BF16, F16 or F32)."""

    def __init__(self, dense: str):
        self.dense = dense
        self.dtype = next(t.torch for t in plugin.FLOAT_TYPES if t.code == dense)
        self.name = NAMES[dense]  # type: ignore[misc]
        self.description = (f"MXFP4 experts (FP4 e2m1 + e8m0 scales per 32, gpt-oss) in a "  # type: ignore[misc]
                            f"{str(self.dtype)[6:]} model: transformers' decode; no encode")

    @property
    def implementation(self) -> str:
        return "torch (transformers' table lookup and ldexp)"

    def find_groups(self, tensors: Mapping[str, BaseTensor]) -> dict[str, list[str]]:
        """``P`` -> ``[P_blocks, P_scales]`` for every MXFP4 parameter of a checkpoint whose dense dtype is
        this backend's, headers and config checked (layout.scan)."""
        config = getattr(tensors, "config", None) or {}
        found = scan(tensors, config)
        if not found or model_dtype(config) != self.dense:
            return {}
        return {param: [param + BLOCKS, param + SCALES] for param in found}

    def group_info(self, param: str, read: Callable[[str], torch.Tensor]) -> tuple[torch.dtype, tuple[int, ...]]:
        """The model dtype and the dense shape, from the scales alone (``[*prefix, R, G]``)."""
        scales = read(param + SCALES)
        return self.dtype, dense_shape((*scales.shape, 16))

    def decode_group(self, param: str, read: Callable[[str], torch.Tensor], names: list[str],
                     settings: Mapping[str, Any] | None = None) -> torch.Tensor:
        """The parameter as transformers dequantizes it; a value that is not finite (an exponent byte 255, or
        one too large for the dtype) is refused naming the tensor."""
        blocks, scales = read(param + BLOCKS), read(param + SCALES)
        if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.dim() < 3 \
                or tuple(blocks.shape[:-1]) != tuple(scales.shape) or blocks.shape[-1] != 16:
            raise InputError(f"MXFP4 blocks {blocks.dtype} {list(blocks.shape)} with scales {scales.dtype} "
                             f"{list(scales.shape)}", tensor=param + BLOCKS, hint=HINT)
        dense = dequantize(blocks, scales, self.dtype)
        bad = plugin.count_nonfinite(dense)
        if bad:
            raise InputError(f"decodes to {bad} NaN or infinite value(s): e8m0 exponents too large for "
                             f"{str(self.dtype)[6:]} (255 is NaN in the format)", tensor=param + SCALES, hint=HINT)
        return dense

    def group_settings(self, param: str, read: Callable[[str], torch.Tensor]) -> dict[str, Any]:
        raise UnsupportedOperationError(NO_QUANTIZER, tensor=param, hint=NO_QUANTIZER_HINT)

    def encode_group(self, param: str, dense: torch.Tensor, settings: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        raise UnsupportedOperationError(NO_QUANTIZER, tensor=param, hint=NO_QUANTIZER_HINT)

    def quantize_settings(self, tensor: BaseTensor, options: Any) -> dict[str, Any]:
        raise UnsupportedOperationError(NO_QUANTIZER, hint=NO_QUANTIZER_HINT)
