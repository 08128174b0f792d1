"""GGUF model files for the GGUF base-merge tests, written with gguf-py from the tiny Hugging Face fixture bases
(names and Q/K row order from plugins/gguf/arch.py, which test_gguf.py checks against an index formula and
the slow tests against llama.cpp's converter), in a chosen type, with metadata of every value type so that
copying it can be checked. K-quants have no Python encoder: such tensors are filled with seeded random
blocks whose scales are set to small finite values (what they decode to is then the base)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from peft_oracle import load_base

from adaptools.plugin import SafetensorsFile
from adaptools_plugins.gguf import arch as gguf_arch
from adaptools_plugins.gguf import codec as gguf_codec

#: Byte offsets of the fp16 scale fields in one block of each K-quant the tests write.
KQUANT_SCALES = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
#: Metadata of every value type, to check a merge copies it as stored.
EXTRA = {
    "general.name": ("tiny", gguf.GGUFValueType.STRING),
    "test.bool": (True, gguf.GGUFValueType.BOOL),
    "test.u8": (7, gguf.GGUFValueType.UINT8),
    "test.i16": (-3, gguf.GGUFValueType.INT16),
    "test.u64": (2**40 + 3, gguf.GGUFValueType.UINT64),
    "test.f32": (0.1, gguf.GGUFValueType.FLOAT32),
    "test.f64": (0.1, gguf.GGUFValueType.FLOAT64),
    "test.empty_string": ("", gguf.GGUFValueType.STRING),
}
ARRAYS = {
    "tokenizer.ggml.tokens": ([f"<t{i}>" for i in range(8)] + ["ünïcode", "a b"], gguf.GGUFValueType.STRING),
    "tokenizer.ggml.scores": ([0.5, -1.25, 3.0], gguf.GGUFValueType.FLOAT32),
    "test.i32s": ([-1, 0, 2**31 - 1], gguf.GGUFValueType.INT32),
}


def kquant_bytes(shape: tuple[int, ...], qtype: Q, seed: int) -> np.ndarray:
    """Seeded random K-quant blocks with small finite scales, as rows of bytes."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=gguf_codec.nbytes(qtype, shape), dtype=np.uint8)
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = data.reshape(-1, size)
    for offset in KQUANT_SCALES[qtype]:
        scale = rng.uniform(0.0005, 0.002, size=len(blocks)).astype(np.float16)
        blocks[:, offset:offset + 2] = scale.view(np.uint8).reshape(-1, 2)
    return data.reshape(*shape[:-1], -1)


def write_base(hf_dir: Path, out: Path, weights: Q = Q.F32, *, kquant: dict[str, Q] | None = None,
               alignment: int | None = None, extra: bool = True,
               tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """``hf_dir`` (or ``tensors`` in its layout) as a GGUF base: 2-D weights in ``weights`` (F16 where rows are
    not whole blocks), vectors in F32, and the GGUF tensors named in ``kquant`` as random K-quant blocks."""
    model = gguf_arch.describe_base(str(hf_dir))
    arch = model.family.arch
    writer = gguf.GGUFWriter(out, arch)
    writer.add_type("model")
    writer.add_block_count(model.n_blocks)
    writer.add_head_count(model.n_head)
    writer.add_head_count_kv(model.n_head_kv)
    if alignment:
        writer.add_custom_alignment(alignment)
    if extra:
        for key, (value, vtype) in EXTRA.items():
            writer.add_key_value(key, value, vtype)
        for key, (value, vtype) in ARRAYS.items():
            writer.add_key_value(key, value, gguf.GGUFValueType.ARRAY, vtype)
    values = tensors if tensors is not None else {name: SafetensorsFile(file).get(name)
                                                  for name, file in sorted(model.hf_files.items())}
    for seed, (name, value) in enumerate(values.items()):
        gname = model.gguf_name(name)
        assert gname is not None, name
        array = gguf_arch.to_gguf_layout(model, gname, value.float()).numpy()
        if kquant and gname in kquant:
            writer.add_tensor(gname, kquant_bytes(array.shape, kquant[gname], seed), raw_dtype=kquant[gname])
            continue
        qtype = Q.F32 if array.ndim == 1 else gguf_codec.changed_type(weights, array.shape[-1], weights)
        writer.add_tensor(gname, gguf_codec.encode(array, qtype), raw_dtype=qtype)
    finish(writer)
    return out


def finish(writer: gguf.GGUFWriter) -> None:
    """Write what ``writer`` was given (header, metadata, tensors, in the order gguf-py needs) and close it."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def decoded(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file decoded to float32 (numpy order), by GGUF name."""
    return {t.name: gguf_codec.decode(t) for t in gguf.GGUFReader(path).tensors}


def raw(path: Path) -> dict[str, tuple[Q, bytes]]:
    """Every tensor's type and stored bytes, by GGUF name."""
    return {t.name: (Q(t.tensor_type), np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(path).tensors}


def metadata(path: Path) -> dict[str, tuple[list[str], object]]:
    """Every metadata key's types and value (the header counts left out)."""
    reader = gguf.GGUFReader(path)
    return {k: ([t.name for t in f.types], f.contents()) for k, f in reader.fields.items() if not k.startswith("GGUF.")}


BPE_TARGETS = ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj")
BPE_TEXT = "The quick brown fox jumps over the lazy dog. 12345 tokens, tokens and more tokens!\n" * 20


def write_bpe_llama(tmp: Path) -> Path:
    """A seeded tiny Llama (vocab 300) with a byte-level BPE tokenizer in ``tmp / "base"``, and a LoRA on it in
    ``tmp / "adapter"`` (a dense base ``--to gguf`` can write: its vocabulary is byte-level BPE)."""
    import transformers
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator([BPE_TEXT], trainers.BpeTrainer(
        vocab_size=290, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    torch.manual_seed(11)
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                                      max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=0,
                                      eos_token_id=0)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp / "base")
    tokenizer.save(str(tmp / "base" / "tokenizer.json"))
    (tmp / "base" / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "model_max_length": 10**30}))
    model = get_peft_model(load_base(tmp / "base"), LoraConfig(r=4, lora_alpha=8, target_modules=sorted(BPE_TARGETS)))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.save_pretrained(tmp / "adapter")
    return tmp


#: The metadata keys of a split model (llama.cpp's gguf-split layout).
SPLIT_KEYS = {"split.no", "split.count", "split.tensors.count"}


def split_with_gguf_py(src: Path, out: Path, **split) -> list[Path]:
    """``src`` rewritten by gguf-py's own split writer (``split_max_tensors=`` / ``split_max_size=``): every
    key and tensor as stored, in order. Returns the parts, first to last."""
    reader = gguf.GGUFReader(src)
    arch = reader.get_field("general.architecture").contents()
    writer = gguf.GGUFWriter(out, arch, **split)
    writer.data_alignment = reader.alignment
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", *SPLIT_KEYS):
            continue
        sub = field.types[-1] if len(field.types) > 1 else None
        value = field.contents()
        if field.types[0] == gguf.GGUFValueType.STRING:
            value = bytes(field.parts[field.data[0]])
        elif sub == gguf.GGUFValueType.STRING:
            value = [bytes(field.parts[i]) for i in field.data]
        writer.add_key_value(field.name, value, field.types[0], sub)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=Q(t.tensor_type))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    parts = sorted(out.parent.glob(f"{out.stem}-*-of-*.gguf"))
    return parts or [out]


def llama_cpp_quantized(tmp_path: Path, qtype: str, seed: int) -> tuple[Path, Path]:
    """A 256-wide two-layer tiny Llama saved by transformers, converted to F16 and quantized to ``qtype`` by
    llama.cpp itself (the slow tests' K-quant and IQ bases), and a seeded r=4 LoRA on every projection of it:
    (the quantized GGUF file, the LoRA folder)."""
    import sys

    import transformers
    from conftest import FIXTURES
    from peft import LoraConfig
    from peft_oracle import seeded_lora

    sys.path.insert(0, str(FIXTURES))
    import llamacpp

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    llamacpp.python()
    f16 = llamacpp.convert_base(tmp_path / "hf", tmp_path / "f16.gguf", "f16")
    base = llamacpp.quantize(f16, tmp_path / f"{qtype}.gguf", qtype)
    projections = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    seeded_lora(tmp_path / "hf", LoraConfig(r=4, lora_alpha=8, target_modules=projections), tmp_path / "lora", 4,
                0.05)
    return base, tmp_path / "lora"
