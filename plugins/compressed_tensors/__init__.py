"""The compressed-tensors family: ``quant_method: compressed-tensors`` checkpoints (llm-compressor, vLLM), whose
pack-quantized, float-quantized, int-quantized and NVFP4 weights are decoded as the compressed-tensors library
decompresses them and, for the round-to-nearest formats, encoded back byte for byte as its compressor does
(docs/compressed-tensors.md)."""

from typing import Any

from adaptools.plugin import hookimpl


@hookimpl
def register_backends(register: Any) -> None:
    from .backend import NAMES, CompressedTensors

    for fmt in NAMES:
        register(CompressedTensors(fmt))
