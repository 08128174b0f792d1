"""The ``perplexity`` validator: prove that a merge kept the fine-tune.

It measures perplexity on an evaluation text, in fixed non-overlapping windows, for the base, the base
with the adapter(s) applied at runtime and unmerged (through the method plugin; peft is never imported),
and the merged output. For a bitsandbytes 4-bit base it also measures the 4-bit base with the adapter,
which is what QLoRA trained. The check passes when the merged perplexity is within a relative tolerance
(default 0.5%) of the unmerged one, which catches merges that silently erase the fine-tune (requantizing
into 4-bit) or silently do nothing (mismatched names, a wrong scale, a dropped module).

Needs transformers (``pip install 'adaptools[eval]'``). Models, tokens and the text load as loading.py
loads them for every check (fp32 compute on the CPU, each model's own dtype on CUDA); ``adaptools eval``
(eval_command.py) prints the same measurement for one model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from adaptools import plugin
from adaptools.plugin import InputError, ValidationContext, Verdict

from .loading import EVAL_TEXT_OPTION, applied, check_eval_text, load_model, read_eval_text, tokenize

DEFAULT_TOLERANCE = 0.005
DEFAULT_WINDOW = 256
DEFAULT_MAX_TOKENS = 20_000


@torch.no_grad()
def perplexity(model: Any, ids: torch.Tensor, window: int = DEFAULT_WINDOW, label: str = "scoring"
               ) -> tuple[float, int]:
    """exp(mean next-token NLL) over non-overlapping windows of ``window`` tokens; returns (ppl, tokens scored).

    A 20k-token text on a 7B model takes minutes on a CPU: a progress bar on stderr says how far it is
    (only on a terminal, so logs and ``--json`` output stay clean).
    """
    total, count = 0.0, 0
    device = next(model.parameters()).device
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    window = min(window, limit) if limit else window  # never score past the model's context
    starts = range(0, ids.numel() - 1, window)
    with plugin.progress_bar(len(starts), label) as bar:
        for start in starts:
            bar.update(1)
            chunk = ids[start:start + window].unsqueeze(0).to(device)
            if chunk.shape[1] < 2:
                break
            logits = model(input_ids=chunk).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum")
            total += float(nll)
            count += chunk.shape[1] - 1
    return math.exp(total / count), count


def is_quantized(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    data = plugin.read_json(config, what="config.json")
    quant = data.get("quantization_config") if isinstance(data, dict) else None
    return isinstance(quant, dict) and quant.get("quant_method") == "bitsandbytes"


def evaluate(model_path: str | Path, ids: torch.Tensor, adapters: list[plugin.Adapter],
             window: int, allow_pickle: bool = False) -> tuple[float, int]:
    """(perplexity, tokens scored) of a model, with adapters applied unmerged at runtime if any are given."""
    # Weights as stored; the compute runs in fp32 on the CPU and in the model's own dtype on CUDA.
    model = load_model(model_path, allow_pickle=allow_pickle)
    with applied(model, adapters):
        label = f"scoring {Path(str(model_path)).name}" + (" + adapter" if adapters else "")
        return perplexity(model, ids, window, label)


class Perplexity(plugin.Validator):
    name = "perplexity"
    description = "merged perplexity within a tolerance of base + adapter unmerged (needs transformers)"
    options = (
        EVAL_TEXT_OPTION,
        plugin.ValidatorOption("max_tokens", int, DEFAULT_MAX_TOKENS, help="Tokens of the text to score.",
                                  flag="--max-tokens", minimum=2),
        plugin.ValidatorOption("tolerance", float, DEFAULT_TOLERANCE,
                                  help="Passes when merged and unmerged perplexity differ by at most this share.",
                                  flag="--ppl-tolerance", minimum=0),
        plugin.ValidatorOption("window", int, DEFAULT_WINDOW, help="Tokens per scoring window.", minimum=2),
    )

    def measure(self, model: str, adapters: list[plugin.Adapter], eval_text: str,
                max_tokens: int = DEFAULT_MAX_TOKENS, window: int = DEFAULT_WINDOW,
                allow_pickle: bool = False) -> tuple[float, int]:
        """(perplexity, tokens scored) of one model, for ``adaptools eval`` (pickle weights only when allowed)."""
        ids = tokenize(model, read_eval_text(eval_text), max_tokens)
        return evaluate(model, ids, adapters, window, allow_pickle=allow_pickle)

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Refuse a missing or unreadable evaluation text before the merge writes anything."""
        source = options.get("eval_text")
        if not source:
            raise InputError("the perplexity check needs --eval-text FILE")
        check_eval_text(source)

    def validate(self, context: ValidationContext) -> Verdict:
        options = context.options
        self.check_options(options)
        if context.base is None or context.output is None:
            raise InputError("the perplexity check needs a base and an output")
        if any(w != 1.0 for w in options.get("weights", [])):
            raise InputError("the perplexity check compares against the unmerged adapters, so needs weight 1")
        tolerance = float(options.get("tolerance", DEFAULT_TOLERANCE))
        window = int(options.get("window", DEFAULT_WINDOW))
        ids = tokenize(context.output, read_eval_text(options["eval_text"]), int(options.get("max_tokens",
                                                                                           DEFAULT_MAX_TOKENS)))
        base = context.base
        figures: dict[str, Any] = {"window": window, "tolerance": tolerance}
        figures["base"], figures["tokens"] = evaluate(base, ids, [], window)
        figures["unmerged"] = evaluate(base, ids, context.adapters, window)[0]
        if is_quantized(base):
            figures["base_is_4bit"] = True  # "unmerged" is the 4-bit base with the adapter: what QLoRA trained
        figures["merged"] = evaluate(context.output, ids, [], window)[0]
        drift = abs(figures["merged"] - figures["unmerged"]) / figures["unmerged"]
        figures["relative_difference"] = drift
        passed = drift <= tolerance
        message = (f"merged perplexity {figures['merged']:.4f} vs unmerged {figures['unmerged']:.4f} "
                   f"(base {figures['base']:.4f}): {drift:.2%} apart, tolerance {tolerance:.2%}")
        return Verdict(passed=passed, message=message, figures=figures)

