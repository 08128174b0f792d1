"""The ``perplexity`` validator: prove that a merge kept the fine-tune.

It measures perplexity on an evaluation text, in fixed non-overlapping windows, for the base, the base
with the adapter(s) applied at runtime and unmerged (through the method plugin; peft is never imported),
and the merged output. For a bitsandbytes 4-bit base it also measures the 4-bit base with the adapter,
which is what QLoRA trained. The check passes when the merged perplexity is within a relative tolerance
(default 0.5%) of the unmerged one, which catches merges that silently erase the fine-tune (requantizing
into 4-bit) or silently do nothing (mismatched names, a wrong scale, a dropped module).

Needs transformers (``pip install 'adaptools[eval]'``). Loaded models never run bitsandbytes' CPU 4-bit
forward with its in-place weight repacking (docs/nf4.md, "Weight repacking in the CPU forward").

On the CPU every model computes in fp32, whatever its stored dtype: the weights compared are still the
stored ones (bf16 and 4-bit values are exact in fp32), and CPUs without native bf16 (no AVX512-BF16 or
AMX) run bf16 matrix products some 40x slower than fp32 (1.1 against 41 GFLOPS measured here). On CUDA
each model computes in its own dtype.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import click
import torch

import adaptools
from adaptools import plugin
from adaptools.cli.options import allow_pickle_option, json_option
from adaptools.plugin import InputError, UnsafeInputError, ValidationContext, Verdict

DEFAULT_TOLERANCE = 0.005
DEFAULT_WINDOW = 256
DEFAULT_MAX_TOKENS = 20_000


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"the evaluation text is not UTF-8 (byte {exc.object[exc.start]:#04x} at offset "
                         f"{exc.start})", path=path, hint="save it as UTF-8") from None
    except OSError as exc:
        raise InputError(f"cannot read the evaluation text: {exc.strerror or exc}", path=path) from None


#: The evaluation-text option of the checks that score or compare models on a text (perplexity, logits,
#: generate): the same name, flag and meaning in each.
EVAL_TEXT_OPTION = plugin.ValidatorOption("eval_text", str, help="Evaluation text (.txt or .jsonl).",
                                             flag="--eval-text")


def read_eval_text(source: str) -> str:
    """A text file, a .jsonl with a ``text`` field per line, or a datasets name (``name`` or ``name:config``)."""
    path = Path(source)
    if path.is_file():
        if path.suffix == ".jsonl":
            texts = []
            for i, line in enumerate(_read_text(path).splitlines()):
                if line.strip():
                    try:
                        text = plugin.parse_json(line)["text"]
                    except (InputError, KeyError, TypeError):
                        text = None
                    if not isinstance(text, str):
                        raise InputError(f"line {i + 1} is not a JSON object with a text field", path=path)
                    texts.append(text)
            return "\n\n".join(texts)
        return _read_text(path)
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise InputError("evaluation text not found", path=source,
                         hint="give a .txt or .jsonl file (datasets names need the datasets package)") from None
    name, _, config = source.partition(":")
    try:
        data = datasets.load_dataset(name, config or None, split="test")
    except Exception as exc:  # datasets raises many kinds
        raise InputError(f"cannot load dataset: {str(exc).splitlines()[0]}", path=source) from None
    return "\n\n".join(t for t in data["text"] if t)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise InputError("the perplexity check needs transformers", hint="pip install 'adaptools[eval]'") from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # results go to stdout, and we print no bars
    return transformers


def load_model(path: str | Path, dtype: torch.dtype | None = None, allow_pickle: bool = False) -> Any:
    """A causal LM from a local folder or hub name, 4-bit ones included, safe for CPU forwards (which
    compute in fp32 unless ``dtype`` says otherwise).

    Only safetensors weights are read unless ``allow_pickle`` (``--allow-pickle``): a ``pytorch_model.bin``
    can run code when unpickled. Allowed, transformers reads it with ``torch.load(weights_only=True)``.
    """
    transformers = _transformers()
    folder = Path(str(path))
    if not allow_pickle and folder.is_dir() and not any(folder.glob("*.safetensors")) \
            and any(folder.glob("*.bin")):
        raise UnsafeInputError("the model's weights are a pickle (pytorch_model.bin), which can run code when "
                               "read", path=path, hint="pass --allow-pickle if you trust this file")
    on_cpu = not torch.cuda.is_available()
    kwargs: dict[str, Any] = {"device_map": "cpu"} if on_cpu else {}
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    if dtype is None and on_cpu:
        dtype = torch.float32
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "weights_only" in str(exc) or "pickle" in str(exc).lower():  # never pass on torch's unsafe advice
            first = "its pickle holds more than plain tensors, so it cannot be read safely"
        raise InputError(f"cannot load the model ({first})", path=path) from None
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False  # keep bitsandbytes from repacking weights in place
        if dtype is not None and getattr(module, "compute_dtype", None) is not None:
            module.compute_dtype = dtype  # 4-bit layers: dequantized values are the same, the product in dtype
    if dtype is not None:  # transformers leaves a 4-bit model's dense layers (embeddings, lm_head) as stored
        for param in model.parameters():
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
    return model.eval()


def tokenize(model_path: str | Path, text: str, max_tokens: int) -> torch.Tensor:
    transformers = _transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_path))
    except (OSError, ValueError) as exc:
        raise InputError(f"no tokenizer with the model ({str(exc).splitlines()[0]})", path=model_path) from None
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if ids.numel() < 2:
        raise InputError("the evaluation text is too short", hint="give at least a few hundred tokens")
    return ids[:max_tokens]


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
    with ExitStack() as stack:
        for adapter in adapters:
            stack.enter_context(plugin.get_method(adapter.method).apply(adapter, model))
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
        path = Path(source)
        if not path.is_file() and (path.suffix in (".txt", ".jsonl") or path.exists()
                                   or importlib.util.find_spec("datasets") is None):
            raise InputError("evaluation text not found (or not a file)", path=source,
                             hint="give a .txt or .jsonl file (datasets names need the datasets package)")
        if not path.is_file():
            return
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise InputError(f"cannot read the evaluation text: {exc.strerror or exc}", path=source) from None

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



@click.command(name="eval")
@click.argument("model")
@click.option("--adapter", "adapters", multiple=True, help="Apply this adapter at runtime, unmerged (repeatable).")
@click.option("--eval-text", required=True, metavar="FILE", help="A .txt or .jsonl (text field) file.")
@click.option("--max-tokens", type=click.IntRange(min=2), default=DEFAULT_MAX_TOKENS, show_default=True,
              help="Tokens to score at most.")
@click.option("--window", type=click.IntRange(min=2), default=DEFAULT_WINDOW, show_default=True,
              help="Tokens per scoring window.")
@allow_pickle_option
@json_option
def eval_command(model: str, adapters: tuple[str, ...], eval_text: str, max_tokens: int, window: int,
                 allow_pickle: bool, json_: bool) -> None:
    """Print the perplexity of MODEL (optionally with adapters) on an evaluation text.

    The text is tokenized with MODEL's tokenizer and scored in fixed,
    non-overlapping windows. Needs transformers (pip install 'adaptools[eval]').

    \b
    Example:
      adaptools eval ./merged --eval-text held-out.txt
      adaptools eval ./base --adapter ./my-lora --eval-text held-out.txt --json
      adaptools eval ./base --adapter ./my-prefix --eval-text held-out.txt   (prefix, prompt, P-tuning and bottleneck
                                       adapters, which cannot be merged, are scored this way)
    """
    Perplexity().check_options({"eval_text": eval_text})
    loaded = [adaptools.load(a, allow_pickle=allow_pickle) for a in adapters]
    ppl, tokens = Perplexity().measure(model, loaded, eval_text, max_tokens, window, allow_pickle=allow_pickle)
    if json_:
        click.echo(json.dumps({"model": model, "adapters": list(adapters), "perplexity": ppl, "tokens": tokens,
                               "window": window}, indent=2))
    else:
        click.echo(f"perplexity {ppl:.4f} over {tokens} tokens (windows of {window})")
