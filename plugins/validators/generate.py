"""The ``generate`` validator: greedy continuations of a few prompts, written model against reference.

What people check by hand after a merge: give both models the same prompts and read what they write. The
reference and candidate are those of the ``logits`` check (sides.py: the input model with the adapters the
operation adds, unmerged; the output with those it takes out). Each prompt is continued greedily (argmax, no
sampling) for ``new_tokens`` tokens, all prompts in one batch of equal length. The first token where the two
continuations part is reported with both texts.

A divergence fails the check unless it is a near-tie: where the reference's own logits for the two tokens
differ by no more than the output dtype's max |Δlogit| tolerance, either choice is within rounding of the
other, and greedy decoding picking one is not a change of behaviour (docs/validation.md, "`generate`").
"""

from __future__ import annotations

from typing import Any

import torch

from adaptools import plugin
from adaptools.plugin import ValidationContext, Verdict

from .loading import EVAL_TEXT_OPTION
from .sequences import Sequences
from .sides import Comparison, Tolerance, with_adapters

DEFAULT_PROMPTS = 3
DEFAULT_PROMPT_TOKENS = 16
DEFAULT_NEW_TOKENS = 16


@torch.no_grad()
def greedy(model: Any, prompts: torch.Tensor, new_tokens: int, bar: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(generated ids [prompts, new_tokens], the logits at each step [prompts, new_tokens, vocab]), recomputing
    the whole sequence at each step: no cache, so every model and hook sees plain forwards."""
    device = next(model.parameters()).device
    ids = prompts.to(device)
    steps = []
    for _ in range(new_tokens):
        logits = model(input_ids=ids).logits[:, -1].float()
        steps.append(logits.cpu())
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        bar.update(1)
    return ids[:, prompts.shape[1]:].cpu(), torch.stack(steps, dim=1)


def prompts_of(sequences: Sequences, length: int) -> torch.Tensor:
    """The sequences cut to one common length (at most ``length``), as a batch that needs no padding."""
    common = min(length, *(int(s.numel()) for s in sequences.ids))
    return torch.stack([s[:common] for s in sequences.ids])


class Generate(Comparison):
    name = "generate"
    description = "greedy continuations of a few prompts agree with base + adapter unmerged (first divergence)"
    options = (
        EVAL_TEXT_OPTION,
        plugin.ValidatorOption("prompts", int, DEFAULT_PROMPTS, help="Prompts to continue.", minimum=1),
        plugin.ValidatorOption("prompt_tokens", int, DEFAULT_PROMPT_TOKENS, help="Tokens per prompt.", minimum=1),
        plugin.ValidatorOption("new_tokens", int, DEFAULT_NEW_TOKENS, help="Tokens to generate per prompt.",
                                  minimum=1),
    )

    def validate(self, context: ValidationContext) -> Verdict:
        options = context.options
        prompt_tokens = int(options.get("prompt_tokens") or DEFAULT_PROMPT_TOKENS)
        reference, candidate, dtype, sequences = self.start(context, int(options.get("prompts") or DEFAULT_PROMPTS),
                                                            prompt_tokens + 1)
        new_tokens = int(options.get("new_tokens") or DEFAULT_NEW_TOKENS)
        prompts = prompts_of(sequences, prompt_tokens)
        with plugin.progress_bar(2 * new_tokens, "generate") as bar:
            def run(model: Any) -> tuple[torch.Tensor, torch.Tensor]:
                return greedy(model, prompts, new_tokens, bar)

            (ref_ids, ref_logits), _ = with_adapters(reference, run)
            (cand_ids, _), _ = with_adapters(candidate, run)
        tolerance = Tolerance.of(dtype, float(ref_logits.std(dim=-1).mean()))
        rows, failed = [], []
        for p in range(prompts.shape[0]):
            row: dict[str, Any] = {"prompt": sequences.text(prompts[p].tolist()),
                                   "reference": sequences.text(ref_ids[p].tolist())}
            differ = (ref_ids[p] != cand_ids[p]).nonzero()
            if differ.numel():
                k = int(differ[0])
                margin = float(ref_logits[p, k, ref_ids[p, k]] - ref_logits[p, k, cand_ids[p, k]])
                row.update(diverges_at=k, candidate=sequences.text(cand_ids[p].tolist()), margin=margin,
                           near_tie=margin <= tolerance.max_logit)
                if not row["near_tie"]:
                    failed.append(row)
            rows.append(row)
        figures = {"source": sequences.source, "prompt_tokens": int(prompts.shape[1]), "new_tokens": new_tokens,
                   "reference": reference.label, "candidate": candidate.label, "tolerance": tolerance.to_json(),
                   "continuations": rows}
        diverged = [r for r in rows if "diverges_at" in r]
        if failed:
            first = failed[0]
            return Verdict(False, f"{len(failed)} of {len(rows)} continuations diverge; first at token "
                                  f"{first['diverges_at']} of {first['prompt']!r}: reference {first['reference']!r}, "
                                  f"output {first['candidate']!r}", figures)
        ties = f" ({len(diverged)} part at a near-tie, within the {tolerance.dtype} tolerance)" if diverged else ""
        return Verdict(True, f"{len(rows)} greedy continuations of {new_tokens} tokens agree{ties} "
                             f"({sequences.source})", figures)
