"""The two sides the ``logits`` and ``generate`` checks compare, how far apart they may be, and the base
class of those checks (:class:`Comparison`).

The *reference* is the operation's input model with the adapters it adds applied at runtime, unmerged,
through their method plugins; the *candidate* is the written output with the adapters it took out applied
the same way. For ``merge`` that is base + adapter against the merged model; for ``unmerge`` the merged
model against OUT + adapter; for ``swap`` merged + added against OUT + removed. A 4-bit base stays 4-bit
(bitsandbytes' own layers, as QLoRA trained). Each side's model loads with loading.py's safe loader, in
fp32 on every device, one model in memory at a time.

How far apart they may be is a :class:`Tolerance` of the output's weight dtype, relative to the spread of
the reference's logits (docs/validation.md, "Tolerances").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from adaptools import plugin
from adaptools.plugin import InputError, ValidationContext

from .loading import applied, check_eval_text, load_model, needs_transformers
from .sequences import Sequences, token_sequences

#: Unit roundoff (spacing of 1.0) of each output weight dtype; a quantized output is held to its dense dtype's.
UNIT = {"F64": 2.0**-52, "F32": 2.0**-23, "F16": 2.0**-10, "BF16": 2.0**-7}
#: The floor for fp32 arithmetic: merged and unmerged models round their products in different orders, and
#: over a deep network that moves logits by up to ~2⁻¹⁸·σ (SmolLM2-135M, fp32 merge: 2.2e-5·σ).
COMPUTE_FLOOR = 2.0**-16
#: Tolerances in units of the dtype's roundoff u, relative to the reference logits' spread σ: max |Δlogit| ≤
#: MAX_LOGIT·u·σ and mean KL ≤ MEAN_KL·(u·σ)². Exact merges measure up to 17·u·σ and 0.4·(u·σ)² (bf16, fp16),
#: 4-bit merges that lost the fine-tune 170·u·σ and 500·(u·σ)² or more (docs/validation.md, "Tolerances").
MAX_LOGIT, MEAN_KL = 64.0, 16.0


@dataclass(frozen=True)
class Tolerance:
    """How far the candidate may be from the reference, for an output weight dtype and logit spread σ."""

    dtype: str
    unit: float  # the dtype's roundoff, or the fp32 arithmetic floor when larger
    logit_scale: float  # σ: the reference's per-token standard deviation of logits, averaged over tokens
    mean_kl: float
    max_logit: float

    @classmethod
    def of(cls, dtype: str, logit_scale: float, mean_kl: float | None = None, max_logit: float | None = None,
           unit: float | None = None) -> Tolerance:
        """``unit`` overrides the dtype's roundoff (a GGUF type's, for a GGUF output)."""
        u = max(UNIT.get(dtype, UNIT["F32"]) if unit is None else unit, COMPUTE_FLOOR)
        return cls(dtype, u, logit_scale, MEAN_KL * (u * logit_scale) ** 2 if mean_kl is None else mean_kl,
                   MAX_LOGIT * u * logit_scale if max_logit is None else max_logit)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def output_dtype(path: str) -> str:
    """The output's weight dtype: the one holding most of its floating-point elements (a quantized weight
    counts as its dense dtype: the extra rounding of a 4- or 8-bit merge is what this check catches)."""
    checkpoint = plugin.Checkpoint.open(path)
    counts: dict[str, int] = {}
    for name in checkpoint.parameters():
        tensor = checkpoint.tensor(name)
        if tensor.dtype in UNIT:
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + math.prod(tensor.shape)
    return max(counts, key=counts.__getitem__) if counts else "F32"


@dataclass
class Side:
    """A model folder and the adapters applied to it at runtime, unmerged."""

    path: str
    adapters: list[plugin.Adapter]

    @property
    def label(self) -> str:
        return f"{self.path} + {len(self.adapters)} adapter(s)" if self.adapters else self.path


def sides(context: ValidationContext, check: str) -> tuple[Side, Side]:
    """(reference, candidate): the input model with the adapters the operation adds, and the output with the
    adapters it takes out (``removed``), both applied at runtime."""
    if context.base is None or context.output is None:
        raise InputError(f"the {check} check needs the operation's input model and its output")
    options = context.options
    if any(w != 1.0 for w in options.get("weights", [])):
        raise InputError(f"the {check} check applies the adapters unmerged, which has no weight",
                         hint="run it on a merge with weight 1")
    removed = list(options.get("removed") or [False] * len(context.adapters))
    added = [a for a, r in zip(context.adapters, removed) if not r]
    taken = [a for a, r in zip(context.adapters, removed) if r]
    return Side(context.base, added), Side(context.output, taken)


def compared_sides(check: plugin.Validator, context: ValidationContext) -> tuple[Side, Side, str]:
    """How a check that compares the output with base + adapters unmerged starts: its options checked, the
    two sides, transformers present: (reference, candidate, the output's dtype)."""
    check.check_options(context.options)
    reference, candidate = sides(context, check.name)
    needs_transformers(check.name)
    return reference, candidate, output_dtype(candidate.path)


class Comparison(plugin.Validator):
    """A check that runs both sides on the same token sequences (``logits``, ``generate``). Its
    ``--eval-text`` is optional; when given it is refused as the perplexity check refuses it (missing,
    unreadable) before the operation writes anything."""

    def check_options(self, options: Mapping[str, Any]) -> None:
        source = options.get("eval_text")
        if source:
            check_eval_text(source)

    def start(self, context: ValidationContext, count: int, length: int) -> tuple[Side, Side, str, Sequences]:
        """(reference, candidate, the output's dtype, ``count`` token sequences of at most ``length`` tokens
        through the output's tokenizer), after the options, the sides and transformers are checked."""
        reference, candidate, dtype = compared_sides(self, context)
        sequences = token_sequences(candidate.path, context.options.get("eval_text"), count, length)
        return reference, candidate, dtype, sequences


def with_adapters(side: Side, run: Callable[[Any], Any], bare: Callable[[Any], Any] | None = None) -> tuple[Any, Any]:
    """``run(model)`` on the side's model with its adapters applied (and ``bare(model)`` before they are),
    loading the model for this call only, so that one model is in memory at a time."""
    model = load_model(side.path, dtype=torch.float32)  # fp32 on every device: compare the weights, not the arithmetic
    first = bare(model) if bare is not None else None
    with applied(model, side.adapters):
        return run(model), first
