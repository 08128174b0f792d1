"""A dense Hugging Face base merged straight into one GGUF file: ``merge BASE ADAPTER OUT.gguf [--to gguf]
[--outtype f32|f16|bf16|q8_0]``.

What llama.cpp's converter (``convert_hf_to_gguf.py``) writes for a Llama-family model, built with gguf-py
(its writer's metadata helpers, ``gguf.Metadata``, ``gguf.vocab.BpeVocab`` and ``SpecialVocab``, the tensor
name map): names and Q/K row order from ``arch``, norms and biases in F32, the weights in ``--outtype``
(default F16; Q8_0 falls back to F16 where rows are not whole blocks), the model's hyperparameters and its
byte-level BPE vocabulary. What this cannot write faithfully is refused, naming what is missing (docs/gguf.md,
"A dense base merged into one GGUF file"): another architecture, a quantized base, RoPE scaling, a tokenizer
that is not byte-level BPE, a pre-tokenizer llama.cpp has no name for here."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import gguf
from gguf import GGMLQuantizationType as Q

from adaptools import plugin
from adaptools.plugin import InputError, UnsupportedOperationError

from .arch import ModelShape, describe_base
from .codec import changed_type
from .layout import settings_for
from .writer import Spec

#: ``general.file_type`` for each ``--outtype`` (gguf.LlamaFileType).
FILE_TYPES = {Q.F32: gguf.LlamaFileType.ALL_F32, Q.F16: gguf.LlamaFileType.MOSTLY_F16,
              Q.BF16: gguf.LlamaFileType.MOSTLY_BF16, Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}
#: llama.cpp's pre-tokenizer names for the tokenizer.json pre-tokenizers that are exactly one of its
#: regex sets (docs/gguf.md, "A dense base merged into one GGUF file"): a structural description -> the name.
GPT2_BYTE_LEVEL = {"type": "ByteLevel", "use_regex": True}
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def dense_model(checkpoint: plugin.Checkpoint) -> ModelShape:
    model = describe_base(str(checkpoint.path))
    if not model.family.permute_qk or model.family.arch != "llama":
        raise UnsupportedOperationError(f"--to gguf writes Llama-family models for now, not {model.family.arch}",
                                        path=checkpoint.path, hint="merge to a folder and convert it with "
                                                                   "llama.cpp's convert_hf_to_gguf.py")
    return model


def dense_encodings(checkpoint: plugin.Checkpoint, outtype: Q,
                    encoder: plugin.Backend) -> dict[str, tuple[plugin.Backend, Mapping[str, Any]]]:
    """Every stored parameter as the GGUF tensor llama.cpp's converter writes, encoded by ``encoder`` (the
    GGUF backend that offered the container); refuses what it cannot."""
    if checkpoint.groups:
        raise UnsupportedOperationError("--to gguf needs a dense base; this one is quantized", path=checkpoint.path,
                                        hint="dequantize it first: adaptools dequantize BASE DENSE")
    model = dense_model(checkpoint)
    rope = rope_parameters(checkpoint.config)
    if rope.get("rope_type") not in (None, "default"):
        raise UnsupportedOperationError(f"RoPE scaling {rope.get('rope_type')!r} is not written yet",
                                        path=checkpoint.path / "config.json")
    vocabulary(checkpoint.path, int(checkpoint.config.get("vocab_size") or 0))  # refuses early
    encodings: dict[str, tuple[plugin.Backend, Mapping[str, Any]]] = {}
    for param in checkpoint.location:
        name = model.gguf_name(param)
        if name is None:
            raise UnsupportedOperationError(f"no GGUF tensor for {param} in architecture {model.family.arch}",
                                            path=checkpoint.path, tensor=param)
        shape = tuple(checkpoint.tensor(param).shape)
        # norms, biases and other vectors stay F32, as llama.cpp's converter and loader want them
        dense = len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight")
        qtype = Q.F32 if dense else changed_type(outtype, shape[-1], outtype)
        encodings[param] = (encoder, settings_for(model, name, shape, qtype))
    return encodings


def rope_parameters(config: Mapping[str, Any]) -> dict[str, Any]:
    """RoPE settings: transformers 5's ``rope_parameters``, or the older ``rope_scaling`` + ``rope_theta``."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if "rope_theta" in config:
        rope.setdefault("rope_theta", config["rope_theta"])
    return rope


def pre_tokenizer(tokenizer: Mapping[str, Any], path: Path) -> str:
    """llama.cpp's name for the pre-tokenizer of a tokenizer.json, where it is one of the few whose split is
    exactly one of llama.cpp's regex sets; else a refusal naming it."""
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps if isinstance(s, dict)]
    if tokenizer.get("normalizer") is None:
        if len(steps) == 1 and all(steps[0].get(k) == v for k, v in GPT2_BYTE_LEVEL.items()):
            return "gpt-2"
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex"):
            return "smollm"
        if (kinds == ["Split", "ByteLevel"] and (steps[0].get("pattern") or {}).get("Regex") == LLAMA3_SPLIT
                and not steps[1].get("use_regex", True)):
            return "llama-bpe"
    raise UnsupportedOperationError(f"llama.cpp has no pre-tokenizer name adaptools knows for this tokenizer.json "
                                    f"(pre_tokenizer {json.dumps(pre)[:120]})", path=path,
                                    hint="merge to a folder and convert it with llama.cpp's convert_hf_to_gguf.py")


def vocabulary(folder: Path, vocab_size: int) -> tuple[str, list[str], list[int]]:
    """(pre-tokenizer name, tokens, token types) of a byte-level BPE tokenizer.json: the model's tokens by
    id (gguf-py's ``BpeVocab``), added tokens CONTROL when special else USER_DEFINED, ids up to the model's
    vocabulary size that no token has as ``[PAD<id>]`` UNUSED."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        what = "a SentencePiece tokenizer.model" if (folder / "tokenizer.model").is_file() else "no tokenizer"
        raise UnsupportedOperationError(f"the base has {what}; --to gguf writes byte-level BPE vocabularies "
                                        "(tokenizer.json) for now", path=folder,
                                        hint="merge to a folder and convert it with llama.cpp's convert_hf_to_gguf.py")
    tokenizer = plugin.read_json(path, what="tokenizer.json", max_bytes=256 * 1024 * 1024)
    if not isinstance(tokenizer, dict):
        raise InputError("tokenizer.json must hold a JSON object", path=path)
    try:
        bpe = gguf.vocab.BpeVocab(folder)
        # the tokenizer.json keys, as str (gguf-py annotates them as bytes)
        base = cast(list[str], [text for text, _, _ in bpe.bpe_tokens()])
    except (FileNotFoundError, ValueError, KeyError, TypeError) as exc:
        model = (tokenizer.get("model") or {}).get("type")
        raise UnsupportedOperationError(f"tokenizer.json is not a byte-level BPE vocabulary ({model or exc})",
                                        path=path, hint="--to gguf writes GPT-2-style BPE vocabularies for now")
    pre = pre_tokenizer(tokenizer, path)
    size = max(vocab_size, len(base))
    tokens: list[str | None] = [*base, *[None] * (size - len(base))]
    types = [int(gguf.TokenType.NORMAL)] * len(base) + [int(gguf.TokenType.UNUSED)] * (size - len(base))
    for added in tokenizer.get("added_tokens") or []:
        tid, content = added.get("id"), added.get("content")
        if not isinstance(tid, int) or not isinstance(content, str) or not 0 <= tid < size:
            raise InputError(f"added token {json.dumps(added)[:80]} has no id within the vocabulary of {size}",
                             path=path)
        tokens[tid] = content
        types[tid] = int(gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
    return pre, [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)], types


def write_metadata(plan: plugin.MergePlan, model: ModelShape, specs: Sequence[Spec], writer: gguf.GGUFWriter) -> None:
    """The metadata llama.cpp's converter writes for a Llama-family model, from config.json and the
    tokenizer files."""
    checkpoint = plan.checkpoint
    config = checkpoint.config
    folder = Path(checkpoint.path)
    outtype = Q.F16 if plan.options.outtype is None else Q[plan.options.outtype.upper()]
    writer.add_type(gguf.GGUFType.MODEL)
    total = sum(spec_numel(s.shape) for s in specs)
    meta = gguf.Metadata.load(None, folder, None, total)
    meta.name = meta.name or folder.name
    meta.size_label = meta.size_label or gguf.size_label(total, total, 0, 0)
    meta.set_gguf_meta_model(writer)
    writer.add_block_count(int(config["num_hidden_layers"]))
    for key, add in (("max_position_embeddings", writer.add_context_length),
                     ("hidden_size", writer.add_embedding_length),
                     ("intermediate_size", writer.add_feed_forward_length),
                     ("num_attention_heads", writer.add_head_count),
                     ("num_key_value_heads", writer.add_head_count_kv)):
        if config.get(key) is not None:
            add(int(config[key]))
    rope = rope_parameters(config)
    if rope.get("rope_theta") is not None:
        writer.add_rope_freq_base(float(rope["rope_theta"]))
    if config.get("rms_norm_eps") is not None:
        writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    head_dim = config.get("head_dim")
    if head_dim is not None:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    writer.add_file_type(FILE_TYPES[outtype])
    vocab_size = int(config.get("vocab_size") or 0)
    writer.add_vocab_size(vocab_size)
    writer.add_rope_dimension_count(int(head_dim or config["hidden_size"] // config["num_attention_heads"]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokenizer_config = read_loose_json(folder / "tokenizer_config.json")
    if isinstance(tokenizer_config, dict) and isinstance(tokenizer_config.get("add_prefix_space"), bool):
        writer.add_add_space_prefix(tokenizer_config["add_prefix_space"])
    pre, tokens, types = vocabulary(folder, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True).add_to_gguf(writer, quiet=True)


def read_loose_json(path: Path, max_bytes: int = 16 << 20) -> Any:
    """A tokenizer settings file as gguf-py's SpecialVocab reads it (real ones hold integers such as
    ``model_max_length: 1e30`` that adaptools' strict reader refuses); None when absent."""
    if not path.is_file():
        return None
    if path.stat().st_size > max_bytes:
        raise InputError(f"larger than {max_bytes} bytes", path=path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"not valid JSON ({str(exc)[:100]})", path=path) from None


def spec_numel(shape: Sequence[int]) -> int:
    numel = 1
    for d in shape:
        numel *= d
    return numel

