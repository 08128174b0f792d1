"""The fine-grained FP8 family: ``quant_method: fp8`` checkpoints (DeepSeek-V3/R1, Qwen3-FP8), float8_e4m3fn
weights with one float32 scale per block, decoded as transformers decodes them and encoded back byte for
byte as its quantizer does (docs/fp8.md)."""

from typing import Any

from adaptools.plugin import hookimpl


@hookimpl
def register_backends(register: Any) -> None:
    from .backend import NAMES, Fp8

    for dense in NAMES:
        register(Fp8(dense))
