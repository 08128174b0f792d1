"""The GPTQ family: ``quant_method: gptq`` checkpoints (AutoGPTQ, GPTQModel, optimum), whose 2/3/4/8-bit linears
are decoded as GPTQModel's dequantizer decodes them and, for ``merge --requantize``, re-encoded onto the grid they
are stored on (docs/gptq.md)."""

from typing import Any

from adaptools.plugin import hookimpl


@hookimpl
def register_backends(register: Any) -> None:
    from .backend import Gptq

    for v1 in (True, False):
        register(Gptq(v1))
