"""The dense family: weights stored as plain fp32, fp16 or bf16 tensors, the backend every unquantized
checkpoint is read and written through (backend.py)."""

from typing import Any

from adaptools.plugin import FLOAT_TYPES, hookimpl


@hookimpl
def register_backends(register: Any) -> None:
    from .backend import Dense

    for kind in FLOAT_TYPES:
        register(Dense(kind))
