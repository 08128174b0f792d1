"""Prefix tuning and P-tuning v2 (PEFT ``PREFIX_TUNING``): learned key/value vectors for every layer.

The only tensor is ``prompt_embeddings`` ``[T, L·2·token_dim]`` (peft-format.md §5.5): T virtual tokens,
L layers, keys and values, ``token_dim = head_dim · num_key_value_heads`` for GQA models. With
``prefix_projection`` PEFT saves the projection MLP's *output*, not the MLP, so the file is always a
plain prefix. These vectors are extra past keys and values that attention attends to: no change of the
weights reproduces them, so prefix adapters cannot be merged.
"""

from __future__ import annotations

from typing import Any

import adaptools
from adaptools import Adapter, Finding

ROLE = "prompt_embeddings"


class PrefixTuning(adaptools.AdapterMethod):
    name = "prefix_tuning"
    description = "Prefix tuning / P-tuning v2 (PEFT PREFIX_TUNING): per-layer virtual keys and values"
    operations = frozenset({"info", "convert"})
    roles = (ROLE,)
    peft_types = ("PREFIX_TUNING",)
    peft_roles = {ROLE: ROLE}
    unsupported = {
        "merge": "prefix tuning adds learned keys and values to every attention layer (virtual tokens); no "
                 "change of the weights reproduces that, so it cannot be merged: serve it with the adapter",
        "algebra": "prefix vectors are not a weight delta",
    }
    rules = {"PREFIX001": ("error", "prompt_embeddings shape disagrees with the config"),
             "PREFIX002": ("error", "tensor other than prompt_embeddings"),
             "PREFIX003": ("error", "NaN or Inf values")}

    def expected_shape(self, config: dict[str, Any]) -> tuple[int, int] | None:
        try:
            tokens = int(config["num_virtual_tokens"]) * int(config.get("num_transformer_submodules") or 1)
            return tokens, int(config["num_layers"]) * 2 * int(config["token_dim"])
        except (KeyError, TypeError, ValueError):
            return None

    def lint(self, adapter: Adapter, base: adaptools.BaseInfo | None = None, *,
             check_values: bool = True) -> list[Finding]:
        findings = []
        expected = self.expected_shape(adapter.config)
        for name in adapter.tensor_names():
            where = adapter.where(name)
            if adaptools.split_name(name)[1] != ROLE:
                findings.append(Finding("PREFIX002", "error", f"unexpected tensor {name}", "drop it", **where))
                continue
            shape = tuple(adapter.info(name).shape)
            if expected is None or shape != expected:
                findings.append(Finding("PREFIX001", "error", f"shape {list(shape)}, config implies "
                                        f"{list(expected) if expected else 'nothing (fields missing)'}",
                                        "ship the adapter_config.json that belongs to these weights", **where))
            elif check_values and not adapter.tensor(name).isfinite().all():
                findings.append(Finding("PREFIX003", "error", "NaN/Inf values", "retrain or re-save", **where))
        return findings

    def summary(self, adapter: Adapter) -> dict[str, Any]:
        config = adapter.config
        return {key: config.get(key) for key in ("num_virtual_tokens", "num_layers", "token_dim",
                                                 "num_attention_heads", "prefix_projection")}


@adaptools.hookimpl
def register_methods(register: Any) -> None:
    register(PrefixTuning())
