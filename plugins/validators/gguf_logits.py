"""The ``logits`` check of a GGUF output: the merged file against the base GGUF with the adapters applied at
runtime by llama.cpp itself (as ``llama-cli -m BASE --lora ADAPTER.gguf`` runs them), on the same token
sequences; the adapters are written as GGUF LoRAs for it (docs/validation.md, "A GGUF output").

The tolerance is the logits check's, in units of the output's coarsest weight type (the type holding most of
the output's matrix elements): a K-quant or 4-bit re-encoding moves the weights by its own rounding, far more
than an F16 one.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import gguf
import torch

import adaptools
from adaptools import plugin
from adaptools.plugin import InputError, ValidationContext

from .llamacpp import Runtime, loaded
from .sequences import PROMPTS, SEED, Sequences
from .sides import COMPUTE_FLOOR, UNIT

#: A GGUF type's rounding relative to its block's largest value (about 2^-(bits - 1)) for the tolerance's unit
#: u; types not listed (IQ, ternary) count as 2-bit (docs/validation.md, "A GGUF output").
GGUF_UNIT = {"F32": UNIT["F32"], "F64": UNIT["F64"], "F16": UNIT["F16"], "BF16": UNIT["BF16"],
             "Q8_0": 2.0**-7, "Q8_1": 2.0**-7, "Q8_K": 2.0**-7, "Q6_K": 2.0**-5,
             "Q5_0": 2.0**-4, "Q5_1": 2.0**-4, "Q5_K": 2.0**-4,
             "Q4_0": 2.0**-3, "Q4_1": 2.0**-3, "Q4_K": 2.0**-3, "IQ4_NL": 2.0**-3, "IQ4_XS": 2.0**-3,
             "Q3_K": 2.0**-2, "Q2_K": 2.0**-1}


def weight_type(path: str) -> str:
    """The GGUF type holding most of the output's matrix elements (norms and biases are F32 everywhere)."""
    counts: dict[str, int] = {}
    for reader in parts(path):
        for tensor in reader.tensors:
            if len(tensor.shape) >= 2:
                name = tensor.tensor_type.name
                counts[name] = counts.get(name, 0) + int(tensor.n_elements)
    return max(counts, key=counts.__getitem__) if counts else "F32"


def parts(path: str) -> list[gguf.GGUFReader]:
    """The output the run just wrote, every part of it when it is split: ``split.count`` parts named as
    llama.cpp finds them from the first, ``PREFIX-00001-of-0000N.gguf`` (docs/gguf.md, "Split models")."""
    first = gguf.GGUFReader(path)
    field = first.get_field("split.count")
    count = int(field.contents()) if field is not None else 1
    if count <= 1:
        return [first]
    prefix = path[:-len(f"-00001-of-{count:05d}.gguf")]
    return [first, *(gguf.GGUFReader(f"{prefix}-{i + 1:05d}-of-{count:05d}.gguf") for i in range(1, count))]


def unit(type_name: str) -> float:
    return max(GGUF_UNIT.get(type_name, 2.0**-1), COMPUTE_FLOOR)


def sequences(runtime: Runtime, eval_text: str | None, count: int, length: int) -> Sequences:
    """The logits check's sequences through llama.cpp's own tokenizer: the evaluation text, else the built-in
    prompts, else (a model without a usable vocabulary) random ids from the fixed seed."""
    from .loading import read_eval_text

    if runtime.n_ctx_train > 1:
        length = min(length, runtime.n_ctx_train)
    if eval_text is not None:
        ids = runtime.tokenize(read_eval_text(eval_text))
        if len(ids) < 2:
            raise InputError("the evaluation text is too short, or the GGUF model has no tokenizer", path=eval_text,
                             hint="give at least a sentence, or drop --eval-text")
        windows = [ids[i:i + length] for i in range(0, min(len(ids), count * length), length)]
        return Sequences([torch.tensor(w) for w in windows if len(w) >= 2] or [torch.tensor(windows[0])],
                         "evaluation text")
    encoded = [runtime.tokenize(p)[:length] for p in (PROMPTS * (1 + count // len(PROMPTS)))[:count]]
    if all(len(e) >= 2 and max(e) < runtime.n_vocab for e in encoded):
        return Sequences([torch.tensor(e) for e in encoded], "built-in prompts")
    generator = torch.Generator().manual_seed(SEED)
    return Sequences([torch.randint(0, runtime.n_vocab, (length,), generator=generator) for _ in range(count)],
                     f"random token ids (seed {SEED})")


def gguf_loras(adapters: list[plugin.Adapter], base: str, folder: Path) -> list[str]:
    """Each adapter written as a GGUF LoRA for ``base`` (what llama.cpp applies at runtime)."""
    paths = []
    for i, adapter in enumerate(adapters):
        path = folder / f"adapter-{i}.gguf"
        try:
            adaptools.save(adapter, path, format="gguf", options=plugin.WriteOptions(base=base))
        except plugin.UnsupportedOperationError as error:
            raise InputError(f"--check logits of a GGUF output applies the adapter in llama.cpp, which cannot take "
                             f"this one: {error}", path=adapter.source,
                             hint="merge to a folder to check it, or drop --check") from None
        paths.append(str(path))
    return paths


def run(context: ValidationContext, count: int, length: int, label: str
        ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], dict[str, Any]]:
    """(reference logits: base + adapters at runtime, candidate logits: the output, the base's own logits,
    figures naming the sides) for a GGUF output."""
    if context.base is None or context.output is None:
        raise InputError("the logits check needs the operation's input model and its output")
    options = context.options
    if any(w != 1.0 for w in options.get("weights", [])) or any(options.get("removed") or []):
        raise InputError("the logits check of a GGUF output applies the adapters at runtime at weight 1 only",
                         hint="run it on a merge with weight 1, or merge to a folder")
    with tempfile.TemporaryDirectory(prefix="adaptools-check-") as folder:
        loras = gguf_loras(context.adapters, context.base, Path(folder))
        with loaded(context.base, "logits") as base:
            seqs = sequences(base, options.get("eval_text"), count, length)
            with plugin.progress_bar(3 * len(seqs.ids), label) as bar:
                bare = base.logits(seqs.ids, [], bar)
                reference = base.logits(seqs.ids, loras, bar)
                with loaded(context.output, "logits") as output:
                    candidate = output.logits(seqs.ids, [], bar)
    figures = {"sequences": len(seqs.ids), "source": seqs.source, "runtime": "llama.cpp",
               "reference": f"{context.base} + {len(loras)} adapter(s) (llama.cpp, at runtime)",
               "candidate": context.output}
    return reference, candidate, bare, figures


def check_unit(context: ValidationContext) -> tuple[str, float]:
    """(the output's weight type, its unit) for :class:`~.sides.Tolerance`."""
    assert context.output is not None
    name = weight_type(context.output)
    return name, unit(name)

