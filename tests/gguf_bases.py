"""GGUF model files for the GGUF base-merge tests, written with gguf-py from the tiny Hugging Face fixture bases
(names and Q/K row order from plugins/gguf/arch.py, which test_gguf.py checks against an index formula and
the slow tests against llama.cpp's converter), in a chosen type, with metadata of every value type so that
copying it can be checked. K-quants have no Python encoder: such tensors are filled with seeded random
blocks whose scales are set to small finite values (what they decode to is then the base)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

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
