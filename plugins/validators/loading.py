"""What every validator that runs a model loads: transformers, the model, its tokenizer, the evaluation text,
and the adapters applied to the model at runtime. One place, so that the ``perplexity``, ``logits`` and
``generate`` checks and ``adaptools eval`` load models the same safe way.

Models load from safetensors only unless ``--allow-pickle``, and never run bitsandbytes' CPU 4-bit forward
with its in-place weight repacking (docs/nf4.md, "Weight repacking in the CPU forward").

On the CPU every model computes in fp32, whatever its stored dtype: the weights compared are still the
stored ones (bf16 and 4-bit values are exact in fp32), and CPUs without native bf16 (no AVX512-BF16 or
AMX) run bf16 matrix products some 40x slower than fp32 (1.1 against 41 GFLOPS measured here). On CUDA
each model computes in its own dtype unless the caller asks for one (docs/validation.md).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, cast

import torch

from adaptools import plugin
from adaptools.plugin import InputError, UnsafeInputError

#: The evaluation-text option of the checks that score or compare models on a text (perplexity, logits,
#: generate): the same name, flag and meaning in each.
EVAL_TEXT_OPTION = plugin.ValidatorOption("eval_text", str, help="Evaluation text (.txt or .jsonl).",
                                             flag="--eval-text")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"the evaluation text is not UTF-8 (byte {exc.object[exc.start]:#04x} at offset "
                         f"{exc.start})", path=path, hint="save it as UTF-8") from None
    except OSError as exc:
        raise InputError(f"cannot read the evaluation text: {exc.strerror or exc}", path=path) from None


def check_eval_text(source: str) -> None:
    """Refuse an evaluation text that is missing or unreadable, before a merge writes anything (a name that
    is no file passes when the datasets package is there to load it)."""
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


def needs_transformers(check: str) -> Any:
    """transformers, quiet (results go to stdout, and the only bar is ours, on a terminal), or an error naming
    the check that needs it. It is used as the untyped library it is: its logging functions and auto classes
    carry no annotations."""
    try:
        transformers = importlib.import_module("transformers")
    except ImportError:
        raise InputError(f"the {check} check needs transformers", hint="pip install 'adaptools[eval]'") from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def load_model(path: str | Path, dtype: torch.dtype | None = None, allow_pickle: bool = False) -> Any:
    """A causal LM from a local folder or hub name, 4-bit ones included, safe for CPU forwards (which
    compute in fp32 unless ``dtype`` says otherwise).

    Only safetensors weights are read unless ``allow_pickle`` (``--allow-pickle``): a ``pytorch_model.bin``
    can run code when unpickled. Allowed, transformers reads it with ``torch.load(weights_only=True)``.
    """
    transformers = needs_transformers("perplexity")
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
    """The first ``max_tokens`` token ids of ``text`` (1-d), through the model's own tokenizer."""
    transformers = needs_transformers("perplexity")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_path))
    except (OSError, ValueError) as exc:
        raise InputError(f"no tokenizer with the model ({str(exc).splitlines()[0]})", path=model_path) from None
    ids: torch.Tensor = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if ids.numel() < 2:
        raise InputError("the evaluation text is too short", hint="give at least a few hundred tokens")
    return ids[:max_tokens]


@contextmanager
def applied(model: Any, adapters: Sequence[plugin.Adapter]) -> Iterator[Any]:
    """``model`` with ``adapters`` applied at runtime, unmerged, through their method plugins (peft is never
    imported); undone on exit. Each method is taken to be runtime-applicable, as the checks document."""
    with ExitStack() as stack:
        for adapter in adapters:
            method = cast(plugin.RuntimeApplicable, plugin.get_method(adapter.method))
            stack.enter_context(method.apply(adapter, model))
        yield model
