"""Prefix tuning and P-tuning v2 (PEFT ``PREFIX_TUNING``): learned key/value vectors for every layer.

What ``save_pretrained`` writes is one tensor, ``prompt_embeddings`` ``[T, L·2·token_dim]`` (docs/peft.md,
"Prefix tuning"): T virtual tokens, L layers, keys and values, ``token_dim = head_dim · num_key_value_heads`` for GQA
models. With ``prefix_projection`` PEFT saves the projection MLP's *output*, not the MLP, so that file is
a plain prefix too. A training checkpoint of the model itself (``accelerate``'s ``save_state``, a
``state_dict`` dump) instead holds the prompt encoder: the embedding ``[T, token_dim]`` and the MLP
``Linear(token_dim, encoder_hidden_size) → tanh → Linear(encoder_hidden_size, L·2·token_dim)``. Those
read into the roles below, and ``convert --bake-projection`` evaluates the MLP once into the plain prefix
PEFT would have saved.

==================  ================================  ===============================================
role                shape                             PEFT state-dict key
==================  ================================  ===============================================
prompt_embeddings   [T, L·2·token_dim]                ``prompt_embeddings``
embedding           [T, token_dim]                    ``prompt_encoder[.default].embedding.weight``
transform_in(_bias) [encoder_hidden, token_dim]       ``prompt_encoder[.default].transform.0.*``
transform_out(_bias) [L·2·token_dim, encoder_hidden]  ``prompt_encoder[.default].transform.2.*``
==================  ================================  ===============================================

These vectors are extra past keys and values that attention attends to: no change of the weights
reproduces them, so prefix adapters cannot be merged. :meth:`PrefixTuning.apply` serves them at runtime
as PEFT does, through ``past_key_values`` (a ``DynamicCache``) and a longer attention mask.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from adaptools import plugin
from adaptools.plugin import (
    Adapter,
    Finding,
    IncompatibleBaseError,
    InputError,
    MemoryStore,
    UnsupportedOperationError,
)

ROLE = "prompt_embeddings"
PROJECTION = ("embedding", "transform_in", "transform_in_bias", "transform_out", "transform_out_bias")
_PEFT_PROJECTION = {"embedding": "embedding.weight", "transform_in": "transform.0.weight",
                    "transform_in_bias": "transform.0.bias", "transform_out": "transform.2.weight",
                    "transform_out_bias": "transform.2.bias"}


_COUNT = {"type": "integer", "minimum": 1, "maximum": 2**20, "description": "a positive integer"}
#: The PrefixTuningConfig fields adaptools reads, with their types and ranges.
CONFIG_SCHEMA = {"type": "object", "properties": {
    "num_virtual_tokens": _COUNT, "num_layers": _COUNT, "token_dim": _COUNT, "num_attention_heads": _COUNT,
    "num_transformer_submodules": {**_COUNT, "type": ["integer", "null"]},
    "encoder_hidden_size": {**_COUNT, "type": ["integer", "null"]},
    "prefix_projection": {"type": ["boolean", "null"]},
}}


class PrefixTuning(plugin.AdapterMethod, plugin.RuntimeApplicable, plugin.Bakeable):
    name = "prefix_tuning"
    description = "Prefix tuning / P-tuning v2 (PEFT PREFIX_TUNING): per-layer virtual keys and values"
    roles = (ROLE,) + PROJECTION
    peft_types = ("PREFIX_TUNING",)
    # Later entries win when writing, so the spelling without the adapter name ("default") comes last.
    peft_roles = {**{f"prompt_encoder.default.{key}": role for role, key in _PEFT_PROJECTION.items()},
                  ROLE: ROLE, **{f"prompt_encoder.{key}": role for role, key in _PEFT_PROJECTION.items()}}
    unsupported = {
        "merge": "prefix tuning adds learned keys and values to every attention layer (virtual tokens); no "
                 "change of the weights reproduces that, so it cannot be merged: serve it with the adapter",
        "algebra": "prefix vectors are not a weight delta; diff compares its tensors",
    }
    rules = {"PREFIX001": ("error", "tensor shape disagrees with the config"),
             "PREFIX002": ("error", "tensor other than prompt_embeddings or the prompt encoder"),
             "PREFIX003": ("error", "NaN or Inf values"),
             "PREFIX004": ("info", "the projection MLP is stored; `convert --bake-projection` makes the plain "
                                   "prefix PEFT saves"),
             "PREFIX005": ("error", "layer count or key/value width disagrees with the base model"),
             "PREFIX006": ("error", "config field has the wrong type or range"),
             "PREFIX007": ("error", "tensor dtype is not fp16, bf16, fp32 or fp64")}

    def expected_shapes(self, config: dict[str, Any]) -> dict[str, tuple[int, ...]] | None:
        try:
            tokens = int(config["num_virtual_tokens"]) * int(config.get("num_transformer_submodules") or 1)
            width = int(config["num_layers"]) * 2 * int(config["token_dim"])
            token_dim = int(config["token_dim"])
        except (KeyError, TypeError, ValueError):
            return None
        shapes: dict[str, tuple[int, ...]] = {ROLE: (tokens, width), "embedding": (tokens, token_dim)}
        hidden = config.get("encoder_hidden_size")
        if isinstance(hidden, int):
            shapes.update({"transform_in": (hidden, token_dim), "transform_in_bias": (hidden,),
                           "transform_out": (width, hidden), "transform_out_bias": (width,)})
        return shapes

    def lint(self, adapter: Adapter, base: plugin.BaseInfo | None = None, *,
             check_values: bool = True) -> list[Finding]:
        problems = plugin.json_problems(adapter.config, CONFIG_SCHEMA)
        if problems:  # nothing below can trust the config
            return [Finding("PREFIX006", "error", message, "fix adapter_config.json (see PEFT's PrefixTuningConfig)",
                            path=adapter.source, field=field) for field, message in problems]
        findings = []
        for name in adapter.tensor_names():
            if adapter.info(name).dtype not in ("F64", "F32", "F16", "BF16"):
                findings.append(Finding("PREFIX007", "error", f"dtype {adapter.info(name).dtype}",
                                        "save the adapter in fp32, fp16 or bf16", **adapter.where(name)))
        if findings:
            return findings
        expected = self.expected_shapes(adapter.config)
        names = {plugin.split_name(n)[1]: n for n in adapter.tensor_names()}
        for name in adapter.tensor_names():
            where = adapter.where(name)
            role = plugin.split_name(name)[1]
            if role not in self.roles:
                findings.append(Finding("PREFIX002", "error", f"unexpected tensor {name}", "drop it", **where))
                continue
            shape = tuple(adapter.info(name).shape)
            if expected is None or shape != expected.get(role):
                implied = list(expected[role]) if expected and role in expected else "nothing (fields missing)"
                findings.append(Finding("PREFIX001", "error", f"shape {list(shape)}, config implies {implied}",
                                        "ship the adapter_config.json that belongs to these weights", **where))
            elif check_values and plugin.count_nonfinite(adapter.tensor(name)):
                findings.append(Finding("PREFIX003", "error", "NaN/Inf values", "retrain or re-save", **where))
        if ROLE not in names and not set(PROJECTION) <= set(names):
            findings.append(Finding("PREFIX002", "error", "neither prompt_embeddings nor the whole prompt encoder "
                                    "(embedding and both projection layers)", "re-save the adapter",
                                    path=adapter.source))
        elif ROLE not in names:
            findings.append(Finding("PREFIX004", "info", "holds the projection MLP, not the prefix it produces",
                                    "adaptools convert ADAPTER OUT --bake-projection", path=adapter.source))
        if base is not None:
            findings += self._lint_base(adapter, base)
        return findings

    def _lint_base(self, adapter: Adapter, base: plugin.BaseInfo) -> list[Finding]:
        c, b = adapter.config, base.config
        layers = b.get("num_hidden_layers") or b.get("n_layer")
        query_heads = b.get("num_attention_heads") or b.get("n_head")
        heads = b.get("num_key_value_heads") or query_heads
        hidden = b.get("hidden_size") or b.get("n_embd")
        head_dim = b.get("head_dim") or (hidden // query_heads if hidden and query_heads else None)
        problems = []
        if layers and c.get("num_layers") != layers:
            problems.append(f"num_layers {c.get('num_layers')}, the base has {layers} layers")
        if heads and head_dim and c.get("token_dim") != heads * head_dim:
            problems.append(f"token_dim {c.get('token_dim')}, the base's keys are {heads}×{head_dim} wide")
        return [Finding("PREFIX005", "error", p, "use the base the adapter was trained on", path=adapter.source,
                        field="num_layers" if p.startswith("num_layers") else "token_dim") for p in problems]

    def summary(self, adapter: Adapter) -> dict[str, Any]:
        config = adapter.config
        out = {key: config.get(key) for key in ("num_virtual_tokens", "num_layers", "token_dim",
                                                "num_attention_heads", "prefix_projection")}
        out["stores"] = "prefix" if any(n.endswith(ROLE) for n in adapter.tensor_names()) else "projection MLP"
        return out

    # --- baking the projection ----------------------------------------------------------------------

    def bake(self, adapter: Adapter) -> Adapter:
        """The plain prefix (``prompt_embeddings``) from a stored prompt encoder, as PEFT's
        ``get_prompt_embedding_to_save`` computes it; an adapter that already is plain comes back unchanged."""
        names = {plugin.split_name(n)[1]: n for n in adapter.tensor_names()}
        if ROLE in names and not set(PROJECTION) & set(names):
            return adapter
        missing = [role for role in PROJECTION if role not in names]
        if missing:
            raise UnsupportedOperationError(f"cannot bake the projection: {', '.join(missing)} missing",
                                            path=adapter.source)
        t = {role: adapter.tensor(names[role]) for role in PROJECTION}
        with torch.no_grad():
            hidden = torch.tanh(F.linear(t["embedding"].unsqueeze(0), t["transform_in"], t["transform_in_bias"]))
            prefix = F.linear(hidden, t["transform_out"], t["transform_out_bias"])[0]
        provenance = {**adapter.provenance, "baked_projection": True}
        return replace(adapter, tensors=MemoryStore({ROLE: prefix.contiguous()}, adapter.source),
                       provenance=provenance)

    # --- runtime application ------------------------------------------------------------------------

    def apply(self, adapter: Adapter, model: torch.nn.Module) -> Any:
        config = adapter.config
        if int(config.get("num_transformer_submodules") or 1) != 1:
            raise UnsupportedOperationError("cannot apply: encoder-decoder prefixes are not supported",
                                            path=adapter.source)
        model_config = getattr(model, "config", None)
        layers = getattr(model_config, "num_hidden_layers", None)
        if layers is not None and layers != config.get("num_layers"):
            raise IncompatibleBaseError(f"the adapter has {config.get('num_layers')} layers of keys and values, "
                                        f"the model {layers}", path=adapter.source)
        return _applied(self.bake(adapter), model)


def past_key_values(adapter: Adapter, batch: int, dtype: torch.dtype, device: torch.device) -> Any:
    """PEFT's ``get_prompt``: ``[T, 2L·H·D]`` viewed ``[B, T, 2L, H, D]``, permuted to per-layer ``(K, V)``."""
    from transformers import DynamicCache

    c = adapter.config
    heads = int(c["num_attention_heads"])
    x = adapter.tensor(ROLE).to(device=device, dtype=dtype).unsqueeze(0).expand(batch, -1, -1)
    x = x.reshape(batch, int(c["num_virtual_tokens"]), int(c["num_layers"]) * 2, heads, int(c["token_dim"]) // heads)
    return DynamicCache([kv.unbind() for kv in torch.split(x.permute(2, 0, 3, 1, 4), 2)])


@contextmanager
def _applied(adapter: Adapter, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """A pre-hook on the model's forward that passes the prefix as ``past_key_values`` and extends the
    attention mask by the virtual tokens, as ``PeftModelForCausalLM.forward`` does."""
    tokens = int(adapter.config["num_virtual_tokens"])

    def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        source = ids if ids is not None else embeds
        if source is None:
            raise InputError("the model was called without input_ids or inputs_embeds", path=adapter.source)
        batch = source.shape[0]
        param = next(module.parameters())  # a 4-bit model's first parameter is packed: ask for its dtype
        kwargs["past_key_values"] = past_key_values(adapter, batch, getattr(module, "dtype", param.dtype),
                                                    param.device)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, tokens), mask], dim=1)
        return args, kwargs

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield model
    finally:
        handle.remove()
