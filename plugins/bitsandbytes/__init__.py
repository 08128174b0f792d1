"""The bitsandbytes family: 4-bit NF4/FP4 and 8-bit LLM.int8 weights as transformers saves them, decoded
and re-encoded byte for byte as bitsandbytes does (a C kernel for 4-bit, with a pure-torch fallback), so
that a QLoRA base merges, dequantizes and requantizes as if it were dense.

nf4.py holds the 4-bit backends and codecs (docs/nf4.md), nf4_state.py the 4-bit quant state read and
checked, csrc/nf4_kernels.c the kernel, int8.py the 8-bit backends (docs/int8.md).
"""

from typing import Any

from adaptools.plugin import hookimpl


@hookimpl
def register_backends(register: Any) -> None:
    from .int8 import DENSE, Int8
    from .nf4 import FourBit

    register(FourBit("nf4"))
    register(FourBit("fp4"))
    for dense in DENSE:
        register(Int8(dense))
