"""The LyCORIS family as PEFT saves it: LoHa (Hadamard product of low-rank products) and LoKr (Kronecker
product of factors)."""

from typing import Any

from adaptools.plugin import hookimpl


@hookimpl
def register_methods(register: Any) -> None:
    from .loha import LoHa
    from .lokr import LoKr

    register(LoHa())
    register(LoKr())
