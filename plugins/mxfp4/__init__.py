"""The MXFP4 family: ``quant_method: mxfp4`` checkpoints (gpt-oss), whose fused expert parameters are stored as
FP4 e2m1 codes (``P_blocks``) with one power-of-two e8m0 scale per 32 values (``P_scales``), decoded as
transformers decodes them (docs/mxfp4.md). Dequantize and dequantize-merge only: no reference quantizer runs
on the CPU, so ``--requantize`` is refused."""

from typing import Any

from adaptools.plugin import hookimpl


@hookimpl
def register_backends(register: Any) -> None:
    from .backend import NAMES, Mxfp4

    for dense in NAMES:
        register(Mxfp4(dense))
