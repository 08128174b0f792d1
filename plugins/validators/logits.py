"""The ``logits`` validator: does the written model compute what base + adapter(s) computes?

Both models run on the same few token sequences: the *reference* (the operation's input model with the
adapters it adds applied at runtime, unmerged, through their method plugins) and the *candidate* (the
written output with the adapters it took out applied the same way). For ``merge`` that is base + adapter
against the merged model; for ``unmerge`` the merged model against OUT + adapter; for ``swap`` merged + added
against OUT + removed. A 4-bit base stays 4-bit (bitsandbytes' own layers, as QLoRA trained). Per token it
measures the KL divergence of the candidate's next-token distribution from the reference's, whether the
top-1 token agrees, and the largest logit difference; it passes when all three are within the tolerance of
the output's weight dtype (docs/validation.md, "Tolerances").

For ``adaptools check --check logits`` (operation ``check``) the adapter must also change the base's outputs
beyond that tolerance and keep them finite: a LoRA with ``lora_B = 0`` or ``alpha = 0`` merges "correctly"
and does nothing at all.

Token sequences: ``--eval-text`` when given, else built-in prompts through the model's tokenizer, else
random token ids from a fixed seed (a checkpoint without a tokenizer). Models load with the perplexity
plugin's safe loader (safetensors only, fp32 compute on the CPU, no bitsandbytes weight repacking).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch

from adaptools import plugin
from adaptools.plugin import InputError, ValidationContext, Verdict

from .perplexity import EVAL_TEXT_OPTION, load_model, read_eval_text

DEFAULT_SEQUENCES = 4
DEFAULT_TOKENS = 64
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
    def of(cls, dtype: str, logit_scale: float, mean_kl: float | None = None, max_logit: float | None = None
           ) -> Tolerance:
        u = max(UNIT.get(dtype, UNIT["F32"]), COMPUTE_FLOOR)
        return cls(dtype, u, logit_scale, MEAN_KL * (u * logit_scale) ** 2 if mean_kl is None else mean_kl,
                   MAX_LOGIT * u * logit_scale if max_logit is None else max_logit)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def output_dtype(path: str) -> str:
    """The output's weight dtype: the one holding most of its floating-point elements (a quantized weight
    counts as its dense dtype: the extra rounding of a 4- or 8-bit merge is what this check catches)."""
    checkpoint = plugin.Checkpoint.open(path)
    counts: dict[str, int] = {}
    for name in checkpoint.location:
        if name in checkpoint.companions:
            continue
        tensor = checkpoint.tensor(name)
        if tensor.dtype in UNIT:
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + math.prod(tensor.shape)
    return max(counts, key=counts.__getitem__) if counts else "F32"


# --- the token sequences --------------------------------------------------------------------------------


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


def needs_transformers(check: str) -> Any:
    """transformers, or an error naming the check that needs it (the models are loaded through it)."""
    try:
        import transformers
    except ImportError:
        raise InputError(f"the {check} check needs transformers", hint="pip install 'adaptools[eval]'") from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # our own bar, on a terminal only
    return transformers


def _tokenizer(model_path: str) -> Any:
    transformers = needs_transformers("logits")
    try:
        return transformers.AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError, TypeError, KeyError):  # no tokenizer files, or ones transformers cannot read
        return None


def _model_limits(model_path: str) -> tuple[int, int | None]:
    config = plugin.Checkpoint.open(model_path).config
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
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


# --- running the two sides --------------------------------------------------------------------------------


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
    return reference, candidate, output_dtype(context.output)  # type: ignore[arg-type]


def with_adapters(side: Side, run: Callable[[Any], Any], bare: Callable[[Any], Any] | None = None) -> tuple[Any, Any]:
    """``run(model)`` on the side's model with its adapters applied (and ``bare(model)`` before they are),
    loading the model for this call only, so that one model is in memory at a time."""
    model = load_model(side.path, dtype=torch.float32)  # fp32 on every device: compare the weights, not the arithmetic
    first = bare(model) if bare is not None else None
    with ExitStack() as stack:
        for adapter in side.adapters:
            stack.enter_context(plugin.get_method(adapter.method).apply(adapter, model))
        return run(model), first


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


class Logits(plugin.Validator):
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

    def check_options(self, options: Mapping[str, Any]) -> None:
        source = options.get("eval_text")
        if source:
            from .perplexity import Perplexity

            Perplexity().check_options({"eval_text": source})

    def validate(self, context: ValidationContext) -> Verdict:
        options = context.options
        reference, candidate, dtype = compared_sides(self, context)
        sequences = token_sequences(context.output, options.get("eval_text"),  # type: ignore[arg-type]
                                    int(options.get("sequences") or DEFAULT_SEQUENCES),
                                    int(options.get("tokens") or DEFAULT_TOKENS))
        ref, cand, bare = run_sides(reference, candidate, sequences, bare=bool(reference.adapters or
                                                                              candidate.adapters), label="logits")
        measured = compare(ref, cand)
        tolerance = Tolerance.of(dtype, measured["logit_scale"], options.get("max_kl"), options.get("max_logit_diff"))
        margins = measured.pop("flip_margins")
        figures: dict[str, Any] = {"sequences": len(sequences.ids), "source": sequences.source,
                                   "reference": reference.label, "candidate": candidate.label,
                                   "tolerance": tolerance.to_json(), **measured,
                                   "decisive_flips": sum(1 for m in margins if m > 2 * tolerance.max_logit),
                                   "near_tie_flips": sum(1 for m in margins if m <= 2 * tolerance.max_logit)}
        if bare is not None:
            adapted = ref if reference.adapters else cand
            effect = compare(bare, adapted)
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
