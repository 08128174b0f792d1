"""Another method's adapter written as a plain LoRA (scale 1) from its per-module low-rank factors.

Methods whose delta is a product of factors (AdaLoRA, LoHa, LoKr) convert to LoRA through here
(``convert --to lora``), and their adapter algebra (``combine``, ``resize``) writes its results the same
way. The LoRA method plugin builds the adapter; this module only says which PEFT fields carry over.
"""

from __future__ import annotations

import torch

from adaptools import plugin
from adaptools.plugin import Adapter, LowRank, MemoryStore

#: PEFT config fields every tuner shares that mean the same in a LoRA config.
SHARED_FIELDS = ("task_type", "auto_mapping", "modules_to_save", "inference_mode")


def full_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The adapter's saved full tensors (``replace_<param>``: modules_to_save, biases), carried unchanged."""
    return {n: adapter.tensor(n) for n in adapter.tensor_names() if n.rpartition(".")[2].startswith("replace_")}


def plain_lora(source: Adapter, factors: dict[str, LowRank], extra: dict[str, torch.Tensor] | None = None) -> Adapter:
    """A LoRA adapter holding ``factors`` (``b`` with the scaling folded in) plus ``extra`` full tensors, on
    ``source``'s base. A bias mode ``<method>_only`` (saved biases of adapted modules) becomes ``lora_only``."""
    config = {key: source.config[key] for key in SHARED_FIELDS if key in source.config}
    bias = source.config.get("bias", "none")
    config.update({"peft_type": "LORA", "lora_dropout": 0.0,
                   "bias": "lora_only" if isinstance(bias, str) and bias.endswith("_only") else bias,
                   "fan_in_fan_out": bool(source.config.get("fan_in_fan_out"))})
    template = Adapter("lora", config, MemoryStore({}), base=source.base,
                       provenance={**source.provenance, "converted_from_method": source.method})
    return plugin.get_method("lora").from_low_rank(template, factors, extra)
