"""The PEFT family: the adapter folder format PEFT's ``save_pretrained`` writes, and the helpers every PEFT
method plugin shares (module matching, lint rules, base-tensor lookup, runtime hooks)."""

from typing import Any

from adaptools.plugin import hookimpl


@hookimpl
def register_formats(register: Any) -> None:
    from .format import PeftFormat

    register(PeftFormat())
