"""The AWQ family: ``quant_method: awq`` checkpoints (AutoAWQ, transformers) in the GEMM layout, whose 4-bit
linears are decoded as AutoAWQ's ``dequantize_gemm`` decodes them; ``--requantize`` rounds a merged weight onto
the checkpoint's own stored grid (scales and zero points kept), which is not AWQ calibration (docs/awq.md)."""

from typing import Any

from adaptools.plugin import hookimpl


@hookimpl
def register_backends(register: Any) -> None:
    from .backend import Awq

    register(Awq())
