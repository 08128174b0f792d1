"""The token sequences the ``logits`` and ``generate`` checks give both sides, fixed so that runs compare.

``--eval-text`` when given (the first tokens of it, through the output's tokenizer), else built-in prompts
through the model's tokenizer, else random token ids from a fixed seed (a checkpoint without a tokenizer).
Never longer than the model's context (docs/validation.md, "`logits`").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from adaptools import plugin
from adaptools.plugin import InputError

from .loading import needs_transformers, read_eval_text

SEED = 0
#: Varied text (prose, code, numbers, another language) so that many kinds of tokens are exercised.
PROMPTS = (
    "The committee met on Tuesday to review the budget. After a long discussion about rising costs, the members "
    "agreed to postpone the new library until the spring, when the final figures would be known.",
    "def mean(values):\n    \"\"\"Return the arithmetic mean of a non-empty list.\"\"\"\n    total = 0\n    for v in "
    "values:\n        total += v\n    return total / len(values)\n\nprint(mean([3, 5, 8, 13]))\n",
    "Question: A train leaves at 14:05 and arrives at 17:50. How long is the journey? Answer: The journey takes "
    "3 hours and 45 minutes, or 225 minutes in total. Next question: what is 17 times 23?",
    "Il était une fois, dans un petit village au bord de la mer, une vieille femme qui réparait les filets des "
    "pêcheurs. Chaque matin, elle racontait aux enfants des histoires de tempêtes et de trésors perdus.",
)


@dataclass
class Sequences:
    """Token id sequences (1-d each) and where they came from; ``tokenizer`` decodes them, when there is one."""

    ids: list[torch.Tensor]
    source: str
    tokenizer: Any = None

    def text(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return " ".join(str(int(i)) for i in ids)
        return str(self.tokenizer.decode([int(i) for i in ids]))


def _tokenizer(model_path: str) -> Any:
    transformers = needs_transformers("logits")
    try:
        return transformers.AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError, TypeError, KeyError):  # no tokenizer files, or ones transformers cannot read
        return None


def _model_limits(model_path: str) -> tuple[int, int | None]:
    config = plugin.Checkpoint.open(model_path).config
    nested = config.get("text_config")
    text: dict[str, Any] = nested if isinstance(nested, dict) else config
    vocab = text.get("vocab_size") or config.get("vocab_size")
    if not isinstance(vocab, int) or vocab < 1:
        raise InputError("the model's config.json has no vocab_size", path=model_path)
    limit = text.get("max_position_embeddings") or text.get("n_positions")
    return vocab, limit if isinstance(limit, int) and limit > 1 else None


def token_sequences(model_path: str, eval_text: str | None, count: int, length: int) -> Sequences:
    """``count`` sequences of at most ``length`` tokens: from the evaluation text, the built-in prompts, or
    (no tokenizer) random ids from a fixed seed. Never longer than the model's context."""
    vocab, limit = _model_limits(model_path)
    length = min(length, limit) if limit else length
    tokenizer = _tokenizer(model_path)
    if eval_text is not None:
        if tokenizer is None:
            raise InputError("--eval-text needs the model's tokenizer, and none loads from it", path=model_path)
        ids = tokenizer(read_eval_text(eval_text), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        if ids.numel() < 2:
            raise InputError("the evaluation text is too short", path=eval_text, hint="give at least a sentence")
        windows = [ids[i:i + length] for i in range(0, min(ids.numel(), count * length), length)]
        return Sequences([w for w in windows if w.numel() >= 2] or windows[:1], "evaluation text", tokenizer)
    if tokenizer is not None:
        encoded = [tokenizer(p, add_special_tokens=False, return_tensors="pt")["input_ids"][0][:length]
                   for p in (PROMPTS * (1 + count // len(PROMPTS)))[:count]]
        if all(e.numel() >= 2 and int(e.max()) < vocab for e in encoded):
            return Sequences(encoded, "built-in prompts", tokenizer)
    generator = torch.Generator().manual_seed(SEED)
    return Sequences([torch.randint(0, vocab, (length,), generator=generator) for _ in range(count)],
                     f"random token ids (seed {SEED})")

