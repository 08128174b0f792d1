"""The ``logits`` validator: does the written model compute what base + adapter(s) computes?

Both sides (sides.py: the input model with the adapters the operation adds, unmerged, against the output
with those it takes out) run on the same few token sequences (sequences.py). Per token it measures the KL
divergence of the candidate's next-token distribution from the reference's, whether the top-1 token
agrees, and the largest logit difference; it passes when all three are within the tolerance of the
output's weight dtype (docs/validation.md, "Tolerances").

For ``adaptools check --check logits`` (operation ``check``) the adapter must also change the base's outputs
beyond that tolerance and keep them finite: a LoRA with ``lora_B = 0`` or ``alpha = 0`` merges "correctly"
and does nothing at all.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from adaptools import plugin
from adaptools.plugin import ValidationContext, Verdict

from .loading import EVAL_TEXT_OPTION
from .sequences import Sequences
from .sides import Comparison, Side, Tolerance, with_adapters

DEFAULT_SEQUENCES = 4
DEFAULT_TOKENS = 64


# --- running the two sides --------------------------------------------------------------------------------


@torch.no_grad()
def logits_of(model: Any, sequences: Sequences, bar: Any) -> list[torch.Tensor]:
    """Next-token logits (fp32, [tokens, vocab]) of every sequence, one forward each."""
    device = next(model.parameters()).device
    out = []
    for ids in sequences.ids:
        out.append(model(input_ids=ids.unsqueeze(0).to(device)).logits[0].float().cpu())
        bar.update(1)
    return out


def run_sides(reference: Side, candidate: Side, sequences: Sequences, bare: bool, label: str
              ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor] | None]:
    """(reference logits, candidate logits, and when ``bare`` the logits of the side that has adapters without
    them): one model in memory at a time."""
    with_bare = reference if reference.adapters else candidate
    with plugin.progress_bar((2 + int(bare)) * len(sequences.ids), label) as bar:
        def run(model: Any) -> list[torch.Tensor]:
            return logits_of(model, sequences, bar)

        ref, ref_bare = with_adapters(reference, run, run if bare and with_bare is reference else None)
        cand, cand_bare = with_adapters(candidate, run, run if bare and with_bare is candidate else None)
    return ref, cand, ref_bare if ref_bare is not None else cand_bare


# --- comparing them ----------------------------------------------------------------------------------------


def compare(reference: Sequence[torch.Tensor], candidate: Sequence[torch.Tensor]) -> dict[str, Any]:
    """Per-token KL(reference ‖ candidate) (mean and max), top-1 agreement and max |Δlogit|, in float64, the
    reference's logit spread σ, and where the top-1 token differs, the reference's margin between its two best
    tokens. A non-finite logit on either side is counted, not compared."""
    kls, agree, total, max_diff, nonfinite = [], 0, 0, 0.0, {"reference": 0, "candidate": 0}
    scales: list[torch.Tensor] = []
    flip_margins: list[float] = []
    for ref, cand in zip(reference, candidate):
        nonfinite["reference"] += int((~torch.isfinite(ref)).sum())
        nonfinite["candidate"] += int((~torch.isfinite(cand)).sum())
        if nonfinite["reference"] or nonfinite["candidate"]:
            continue
        r, c = ref.double(), cand.double()
        log_p, log_q = torch.log_softmax(r, dim=-1), torch.log_softmax(c, dim=-1)
        kls.append((log_p.exp() * (log_p - log_q)).sum(dim=-1).clamp_min(0.0))
        same = r.argmax(-1) == c.argmax(-1)
        agree += int(same.sum())
        top2 = r[~same].topk(2, dim=-1).values
        flip_margins += (top2[:, 0] - top2[:, 1]).tolist()
        total += r.shape[0]
        max_diff = max(max_diff, float((r - c).abs().max()))
        scales.append(r.std(dim=-1))
    kl = torch.cat(kls) if kls else torch.zeros(0, dtype=torch.float64)
    return {"tokens": total, "mean_kl": float(kl.mean()) if total else math.nan,
            "max_kl": float(kl.max()) if total else math.nan, "top1_agreement": agree / total if total else math.nan,
            "max_abs_logit_diff": max_diff if total else math.nan, "nonfinite_logits": nonfinite,
            "logit_scale": float(torch.cat(scales).mean()) if total else math.nan, "flip_margins": flip_margins}


def within(figures: Mapping[str, Any], tolerance: Tolerance) -> list[str]:
    """What exceeds the tolerance, as phrases (empty: within it). The top-1 token must agree wherever the
    reference's two best tokens are further apart than twice the logit tolerance: no rounding within the
    tolerance can swap those (``decisive`` tokens); elsewhere a swap is a near-tie, counted but allowed."""
    problems = []
    if figures["mean_kl"] > tolerance.mean_kl:
        problems.append(f"mean KL {figures['mean_kl']:.3g} > {tolerance.mean_kl:.3g}")
    if figures["max_abs_logit_diff"] > tolerance.max_logit:
        problems.append(f"max |Δlogit| {figures['max_abs_logit_diff']:.3g} > {tolerance.max_logit:.3g}")
    if figures["decisive_flips"]:
        problems.append(f"the top-1 token changes at {figures['decisive_flips']} token(s) where the reference "
                        "is decisive")
    return problems


class Logits(Comparison):
    name = "logits"
    description = "the output's next-token logits match base + adapter unmerged, within the dtype's tolerance"
    options = (
        EVAL_TEXT_OPTION,
        plugin.ValidatorOption("sequences", int, DEFAULT_SEQUENCES, help="Token sequences to compare.", minimum=1),
        plugin.ValidatorOption("tokens", int, DEFAULT_TOKENS, help="Tokens per sequence.", minimum=2),
        plugin.ValidatorOption("max_kl", float, help="Override the dtype's mean-KL tolerance.", minimum=0),
        plugin.ValidatorOption("max_logit_diff", float, help="Override the dtype's max |Δlogit| tolerance.",
                                  minimum=0),
    )

    def check_target(self, container: str, directory: bool) -> None:
        """A GGUF file is checked in llama.cpp (gguf_logits.py) when llama-cpp-python is installed."""
        if directory:
            return
        if container != "gguf":
            super().check_target(container, directory)
        from .llamacpp import require

        require(self.name)

    def validate(self, context: ValidationContext) -> Verdict:
        options = context.options
        count, length = int(options.get("sequences") or DEFAULT_SEQUENCES), int(options.get("tokens") or DEFAULT_TOKENS)
        if context.output is not None and Path(context.output).is_file():  # a single-file (GGUF) output
            from .gguf_logits import check_unit, run

            self.check_options(options)
            ref, cand, bare, sides_figures = run(context, count, length, "logits")
            dtype, unit = check_unit(context)
            return self._judge(context, ref, cand, bare, sides_figures, dtype, unit)
        reference, candidate, dtype, sequences = self.start(context, count, length)
        ref, cand, maybe_bare = run_sides(reference, candidate, sequences, bare=bool(reference.adapters or
                                                                                    candidate.adapters), label="logits")
        named = {"sequences": len(sequences.ids), "source": sequences.source, "reference": reference.label,
                 "candidate": candidate.label}
        return self._judge(context, ref, cand, maybe_bare, named, dtype, None,
                           adapted=ref if reference.adapters else cand)

    def _judge(self, context: ValidationContext, ref: list[torch.Tensor], cand: list[torch.Tensor],
               bare: list[torch.Tensor] | None, named: dict[str, Any], dtype: str, unit: float | None, *,
               adapted: list[torch.Tensor] | None = None) -> Verdict:
        """The verdict on two sides' logits (and, with ``bare``, the adapters' own effect on ``adapted``,
        by default the reference)."""
        options = context.options
        measured = compare(ref, cand)
        tolerance = Tolerance.of(dtype, measured["logit_scale"], options.get("max_kl"), options.get("max_logit_diff"),
                                 unit)
        margins = measured.pop("flip_margins")
        figures: dict[str, Any] = {**named, "tolerance": tolerance.to_json(), **measured,
                                   "decisive_flips": sum(1 for m in margins if m > 2 * tolerance.max_logit),
                                   "near_tie_flips": sum(1 for m in margins if m <= 2 * tolerance.max_logit)}
        if bare is not None:
            effect = compare(bare, ref if adapted is None else adapted)
            figures["adapter_effect"] = {k: effect[k] for k in ("mean_kl", "max_kl", "top1_agreement",
                                                                "max_abs_logit_diff", "nonfinite_logits")}
        return self._verdict(figures, tolerance, context.operation == "check")

    def _verdict(self, figures: dict[str, Any], tolerance: Tolerance, checking_adapter: bool) -> Verdict:
        bad = figures["nonfinite_logits"]
        if bad["reference"] or bad["candidate"]:
            where = "the reference (input model with the adapters)" if bad["reference"] else "the output"
            return Verdict(False, f"{where} produces non-finite logits ({bad['reference'] or bad['candidate']} "
                                  "NaN or infinite values)", figures)
        effect = figures.get("adapter_effect")
        if checking_adapter and effect is not None and (
                effect["max_abs_logit_diff"] <= tolerance.max_logit and effect["mean_kl"] <= tolerance.mean_kl):
            return Verdict(False, f"the adapter does not change the base's outputs (max |Δlogit| "
                                  f"{effect['max_abs_logit_diff']:.3g}, mean KL {effect['mean_kl']:.3g}, within the "
                                  f"{tolerance.dtype} tolerance): a silent no-op, e.g. an untrained (zero) lora_B or "
                                  "alpha 0", figures)
        problems = within(figures, tolerance)
        summary = (f"mean KL {figures['mean_kl']:.3g}, top-1 agreement {figures['top1_agreement']:.2%}, max "
                   f"|Δlogit| {figures['max_abs_logit_diff']:.3g} over {figures['tokens']} tokens "
                   f"({figures['source']})")
        if effect is not None:
            summary += f"; the adapter itself moves mean KL by {effect['mean_kl']:.3g}"
        if problems:
            return Verdict(False, f"the output does not behave like the reference: {'; '.join(problems)} "
                                  f"({tolerance.dtype} tolerance); {summary}", figures)
        return Verdict(True, f"{summary}; within the {tolerance.dtype} tolerance", figures)
