"""The prompt family: prefix tuning (P-tuning v2), prompt tuning and P-tuning. Their virtual tokens are
extra inputs, not a weight change: they are read, checked, baked and applied at runtime, never merged,
which is why they form a family of their own (docs/prompt-tuning.md).

prefix.py holds prefix tuning (keys and values served through ``past_key_values``); tuning.py prompt
tuning and P-tuning (embeddings before the input); runtime.py the hooks that put those embeddings in
front of a live model's input.
"""

from typing import Any

from adaptools.plugin import hookimpl


@hookimpl
def register_methods(register: Any) -> None:
    from .prefix import PrefixTuning
    from .tuning import PromptTuning, PTuning

    register(PrefixTuning())
    register(PromptTuning())
    register(PTuning())
