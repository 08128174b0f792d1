"""The gptq family and the fixture builder against GPTQModel's own code (fixtures/gptq_oracle.py: its
``model_dequant`` module run in a cached venv): decode bit for bit as its ``convert_gptq_file``, packing as its
``pack_cols`` / ``unpack_rows``, v1 zero points as its ``_correct_gptq_v1_qzeros``, and a ``--requantize`` output
decoded by it as by us. Slow: the first run builds the venv (a few minutes)."""

from __future__ import annotations

import json

import pytest
import torch
from gptq_checks import VARIANTS, build_gptq, gptq_oracle, same
from safetensors.torch import load_file, save_file

import adaptools
from adaptools import MergeInput, merge
from adaptools.checkpoint import Checkpoint
from adaptools_plugins.gptq import codec

pytestmark = pytest.mark.slow

DEQUANTIZE = """
import json, sys, torch
from pathlib import Path
from safetensors.torch import save_file
for path in sys.argv[1:]:
    path = Path(path)
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    tensors = md.convert_gptq_file(path / "model.safetensors", getattr(torch, DTYPE), config, "cpu")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path) + ".gptqmodel.safetensors")
"""


def library_dequantized(*paths, dtype="float16"):
    """GPTQModel's ``convert_gptq_file`` of each checkpoint folder, as ``dtype`` tensors."""
    gptq_oracle.run(DEQUANTIZE.replace("sys.argv[1:]", repr([str(p) for p in paths])).replace("DTYPE", repr(dtype)))
    return [load_file(f"{p}.gptqmodel.safetensors") for p in paths]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    from peft import LoraConfig
    from peft_oracle import seeded_lora

    root = tmp_path_factory.mktemp("gptq-oracle")
    paths = build_gptq.build(root)
    seeded_lora(paths["llama-gptq-dense"], LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]),
                root / "lora", 7, 0.05)
    paths["lora"] = root / "lora"
    return paths


def test_decode_and_the_builders_rule_are_gptqmodels_dequantization(bases):
    """Every GPTQ linear of every variant (2/3/4/8 bits, gptq and gptq_v2, act-order g_idx, one group): our
    decode and the fixture builder's plain decode are bit for bit GPTQModel's ``convert_gptq_file`` in fp16."""
    theirs = library_dequantized(*(bases[name] for name in VARIANTS))
    for name, library in zip(VARIANTS, theirs):
        bits, _, _, _, fmt = build_gptq.VARIANTS[name]
        checkpoint = Checkpoint.open(bases[name])
        stored = load_file(str(bases[name] / "model.safetensors"))
        assert len(checkpoint.groups) == 14
        for param in checkpoint.groups:
            assert same(checkpoint.read(param), library[param]), (name, param)
            module = param.removesuffix(".weight")
            assert same(build_gptq.decode(stored, module, bits, fmt == "gptq"), library[param]), (name, param)


PACKING = """
import torch
from safetensors.torch import load_file, save_file
data = load_file(PATH)
out = {}
for bits in (2, 3, 4, 8):
    words, codes = data[f"words{bits}"], data[f"codes{bits}"]
    out[f"rows{bits}"] = md.unpack_rows(words, bits)
    out[f"cols{bits}"] = md.unpack_cols(words.t().contiguous(), bits)
    out[f"pack{bits}"] = md.pack_cols(codes.t().contiguous(), bits, pack_dtype=torch.int32)
    out[f"v1{bits}"] = md.unpack_cols(md._correct_gptq_v1_qzeros(words.t().contiguous(), bits), bits)
save_file({k: v.contiguous() for k, v in out.items()}, PATH + ".out")
"""


def test_packing_and_v1_zero_points_are_gptqmodels(tmp_path):
    """Random words and codes, every width: unpacking along rows and columns, packing (the library packs
    ``qzeros`` along columns; ``qweight`` is the same along rows) and v1 zero points (stored minus one, wrapping
    in the field) are the library's, for our codec and for the fixture builder's packer."""
    torch.manual_seed(11)
    data = {}
    for bits in (2, 3, 4, 8):
        data[f"words{bits}"] = torch.randint(-2**31, 2**31 - 1, (bits * 3, 6), dtype=torch.int32)
        data[f"codes{bits}"] = torch.randint(0, 1 << bits, (96, 6), dtype=torch.int32)
    path = tmp_path / "packing.safetensors"
    save_file(data, str(path))
    gptq_oracle.run(PACKING.replace("PATH", repr(str(path))))
    theirs = load_file(f"{path}.out")
    for bits in (2, 3, 4, 8):
        words, codes = data[f"words{bits}"], data[f"codes{bits}"]
        assert torch.equal(codec.unpack_rows(words, bits), theirs[f"rows{bits}"]), bits
        assert torch.equal(codec.unpack_cols(words.t(), bits), theirs[f"cols{bits}"]), bits
        assert torch.equal(codec.pack_rows(codes, bits), theirs[f"pack{bits}"].t()), bits
        assert torch.equal(build_gptq.pack(codes, bits), theirs[f"pack{bits}"].t()), bits
        assert torch.equal(build_gptq.unpack(words, bits), theirs[f"rows{bits}"]), bits
        assert torch.equal(codec.zero_points(words.t(), bits, v1=True), theirs[f"v1{bits}"]), bits


@pytest.mark.parametrize("name", ["llama-gptq-4-act", "llama-gptq-3"])
def test_a_requantized_output_decodes_through_gptqmodel_as_through_us(bases, name, tmp_path):
    """merge --requantize writes a checkpoint GPTQModel reads, with the base's config: its decode of every
    weight, changed or not, is ours."""
    out = tmp_path / name
    merge(bases[name], [MergeInput(adaptools.load(bases["lora"]))], out, requantize=True)
    assert json.loads((out / "config.json").read_text()) == json.loads((bases[name] / "config.json").read_text())
    (library,) = library_dequantized(out)
    checkpoint = Checkpoint.open(out)
    assert all(same(checkpoint.read(p), library[p]) for p in checkpoint.groups)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_bf16_and_fp32_scales_decode_as_gptqmodel_does_in_their_dtype(bases, dtype, tmp_path):
    """Scales stored in bf16 or fp32 (the fixture's fp16 scales converted): the dense weight is in that dtype,
    bit for bit GPTQModel's ``convert_gptq_file`` with it as the target."""
    import shutil

    path = tmp_path / "base"
    shutil.copytree(bases["llama-gptq-4-act"], path)
    state = load_file(str(path / "model.safetensors"))
    state = {k: v.to(getattr(torch, dtype)) if k.endswith(".scales") else v for k, v in state.items()}
    save_file(state, str(path / "model.safetensors"), {"format": "pt"})
    (library,) = library_dequantized(path, dtype=dtype)
    checkpoint = Checkpoint.open(path)
    assert len(checkpoint.groups) == 14
    assert all(same(checkpoint.read(p), library[p]) for p in checkpoint.groups)
