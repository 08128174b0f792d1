"""The prompt family: prefix tuning (P-tuning v2), prompt tuning and P-tuning. Their virtual tokens are
extra inputs, not a weight change: they are read, checked, baked and applied at runtime, never merged."""

from typing import Any

from adaptools.plugin import hookimpl


@hookimpl
def register_methods(register: Any) -> None:
    from .prefix import PrefixTuning
    from .tuning import PromptTuning, PTuning

    register(PrefixTuning())
    register(PromptTuning())
    register(PTuning())
