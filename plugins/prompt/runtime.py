"""Serving virtual-token embeddings at runtime, as ``PeftModelForCausalLM.forward`` does for prompt tuning
and P-tuning (docs/prompt-tuning.md, "Runtime application (`PeftModelForCausalLM.forward`)"): the prompts
go in front of the input embeddings, and the attention mask and labels grow by as many positions.

The hooks work on any transformers causal LM: a pre-hook on the model's forward turns ``input_ids`` into
``inputs_embeds`` with the prompts in front, and a hook after it drops the virtual positions from the
logits so that callers (the perplexity validator, ``adaptools eval``) get one logit row per input
token. PEFT itself returns the virtual positions too; the rows we keep are bit-identical to its
``logits[:, n_virtual:]``, and a loss computed from labels is PEFT's own (it includes the prediction of
the first real token from the last virtual one).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from adaptools.plugin import InputError, UnsupportedOperationError


def _position_limit(model: torch.nn.Module) -> int | None:
    """How many positions a model with *learned* position embeddings (GPT-2's ``wpe``) can index; None
    for rotary and other computed positions, which have no hard limit."""
    config = getattr(model, "config", None)
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if not limit:
        return None
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        if (isinstance(module, torch.nn.Embedding) and module.num_embeddings == limit
                and (leaf == "wpe" or "position" in leaf)):
            return int(limit)
    return None


@contextmanager
def prepended(prompts: torch.Tensor, model: torch.nn.Module, source: str) -> Iterator[torch.nn.Module]:
    """Within the block, every forward of ``model`` sees ``prompts`` ``[n, hidden]`` before its input.

    As PEFT: ``position_ids`` and ``token_type_ids`` are dropped (the virtual tokens take positions
    0..n-1), the mask gains ``n`` leading ones (a float prefix, as PEFT builds it), labels gain ``n``
    leading -100s. Incremental decoding with a filled cache is refused: the prompts belong to the cache
    then, which only PEFT's generation code arranges.
    """
    n = int(prompts.shape[0])
    embed = model.get_input_embeddings()  # type: ignore[operator]
    signature = inspect.signature(model.forward)
    limit = _position_limit(model)
    lengths: list[int] = []

    def before(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        bound = signature.bind_partial(*args, **kwargs).arguments
        extra = bound.pop("kwargs", None)
        if isinstance(extra, dict):
            bound.update(extra)
        cache = bound.get("past_key_values", bound.get("cache"))  # transformers 5.24 starts renaming it
        if cache is not None and getattr(cache, "get_seq_length", lambda: 1)() > 0:
            raise UnsupportedOperationError("prompt tuning at runtime serves whole forwards, not incremental "
                                            "decoding with a filled cache", path=source)
        if bound.get("return_dict") is False:
            raise UnsupportedOperationError("prompt tuning at runtime needs return_dict outputs", path=source)
        ids, embeds = bound.pop("input_ids", None), bound.get("inputs_embeds")
        if embeds is None:
            if ids is None:
                raise InputError("the model was called without input_ids or inputs_embeds", path=source)
            embeds = embed(ids)
        batch, length = embeds.shape[0], embeds.shape[1]
        if limit is not None and n + length > limit:
            raise InputError(f"{length} tokens plus {n} virtual tokens exceed the model's {limit} positions",
                             path=source, hint="score shorter windows (--window)")
        front = prompts.to(embeds.device).repeat(batch, 1, 1).to(embeds.dtype)
        bound["inputs_embeds"] = torch.cat((front, embeds), dim=1)
        mask = bound.get("attention_mask")
        if mask is not None:
            bound["attention_mask"] = torch.cat((torch.ones(batch, n).to(mask.device), mask), dim=1)
        labels = bound.get("labels")
        if labels is not None:
            bound["labels"] = torch.cat((torch.full((batch, n), -100).to(labels.device), labels), dim=1)
        for dropped in ("position_ids", "token_type_ids"):
            if dropped in bound:
                bound[dropped] = None
        lengths.append(length)
        return (), bound

    def after(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        length = lengths.pop()
        logits = getattr(output, "logits", None)
        if logits is not None and logits.shape[1] > length:  # logits_to_keep may already have cut them
            output.logits = logits[:, -length:]
        return output

    handles = [model.register_forward_pre_hook(before, with_kwargs=True),
               model.register_forward_hook(after, with_kwargs=True)]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
