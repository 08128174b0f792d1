"""The orthogonal family: OFT and BOFT, which multiply a weight by an orthogonal matrix instead of adding a
delta."""

from typing import Any

from adaptools.plugin import hookimpl


@hookimpl
def register_methods(register: Any) -> None:
    from .boft import BOFT
    from .oft import OFT

    register(OFT())
    register(BOFT())
