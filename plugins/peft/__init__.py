"""The PEFT family: the adapter folder format PEFT's ``save_pretrained`` writes (``format.py``), and what every
PEFT method family builds on, so that none builds on another for it: module matching (``matching.py``), the
common lint rules (``lint.py``), base-tensor lookup, weight layouts and runtime hooks (``common.py``), and the
base of additive-delta methods (``additive.py``)."""

from typing import Any

from adaptools.plugin import hookimpl


@hookimpl
def register_formats(register: Any) -> None:
    from .format import PeftFormat

    register(PeftFormat())
