"""Another method's adapter written as a plain LoRA (scale 1) from its per-module low-rank factors.

Methods whose delta is an exact product of factors (AdaLoRA, LoHa, LoKr) convert to LoRA through here
(``convert --to lora``), and their adapter algebra (``combine``, ``resize``) writes its results the same
way: :class:`ViaPlainLoRA` gives them both. LoRA's own ``from_low_rank`` builds the adapter; this module
only says which PEFT fields carry over.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from adaptools import plugin
from adaptools.plugin import Adapter, BaseInfo, LowRank, MemoryStore

from .method import LoRA

#: PEFT config fields every tuner shares that mean the same in a LoRA config.
SHARED_FIELDS = ("task_type", "auto_mapping", "modules_to_save", "inference_mode")


def full_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The adapter's saved full tensors (``replace_<param>``: modules_to_save, biases), carried unchanged."""
    return {n: adapter.tensor(n) for n in adapter.tensor_names() if n.rpartition(".")[2].startswith("replace_")}


def plain_lora(source: Adapter | None, factors: dict[str, LowRank],
               extra: dict[str, torch.Tensor] | None = None) -> Adapter:
    """A LoRA adapter holding ``factors`` (``b`` with the scaling folded in) plus ``extra`` full tensors, on
    ``source``'s base (no source: a fresh config). A bias mode ``<method>_only`` (saved biases of adapted
    modules) becomes ``lora_only``."""
    if source is None:
        return LoRA().from_low_rank(None, factors, extra)
    config = {key: source.config[key] for key in SHARED_FIELDS if key in source.config}
    bias = source.config.get("bias", "none")
    config.update({"peft_type": "LORA", "lora_dropout": 0.0,
                   "bias": "lora_only" if isinstance(bias, str) and bias.endswith("_only") else bias,
                   "fan_in_fan_out": bool(source.config.get("fan_in_fan_out"))})
    template = Adapter("lora", config, MemoryStore({}), base=source.base,
                       provenance={**source.provenance, "converted_from_method": source.method})
    return LoRA().from_low_rank(template, factors, extra)


class ViaPlainLoRA(plugin.LowRankAlgebra, plugin.PlainConvertible):
    """Adapter algebra and ``convert --to lora`` for a method whose ``low_rank`` factors are exact: both
    give plain LoRA adapters (scale 1)."""

    plain_method = "lora"  # what to_plain returns (convert --to lora)

    def from_low_rank(self, template: Adapter | None, factors: dict[str, LowRank],
                      extra: dict[str, torch.Tensor] | None = None) -> Adapter:
        """Results of adapter algebra are plain LoRA (scale 1) on the template's base."""
        return plain_lora(template, factors, extra)

    def to_plain(self, adapter: Adapter, base: BaseInfo | None, read: Callable[[str], torch.Tensor] | None,
                 initial: Adapter | None, options: Mapping[str, Any] | None = None) -> Adapter:
        """The exact plain LoRA of the same ranks (``convert --to lora``; ``--rank``/``--energy`` then
        truncate it by SVD); saved full tensors are carried over."""
        return plain_lora(adapter, self.low_rank(adapter), full_tensors(adapter))
