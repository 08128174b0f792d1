"""compressed-tensors bases (``quant_method: compressed-tensors``): every operation against the compressed-tensors
library, transformers and PEFT. Hostile checkpoints are in test_compressed_tensors_inputs.py."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from ct_checks import KINDS, build_ct, library_compress, library_decompress, same, state_of
from peft_oracle import seeded_lora
from safetensors.torch import load_file

import adaptools
from adaptools import MergeInput, merge
from adaptools.checkpoint import Checkpoint
from adaptools_plugins.compressed_tensors import codec

DOWN = "model.layers.1.mlp.down_proj.weight"  # 196 columns; an all-zero row
GATE = "model.layers.1.mlp.gate_proj.weight"
Q = "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """The dense original, its pack/fp8/int8 compressions by the library, and PEFT LoRAs on the original:
    every linear, and q_proj + gate_proj of layer 1."""
    from peft import LoraConfig

    root = tmp_path_factory.mktemp("ct")
    paths = build_ct.build(root, KINDS)
    linears = build_ct.LINEARS
    seeded_lora(paths["llama-ct-dense"], LoraConfig(r=4, lora_alpha=8, target_modules=linears), root / "lora", 5,
                0.05)
    seeded_lora(paths["llama-ct-dense"], LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"],
                                                    layers_to_transform=[1]), root / "lora-layer1", 6, 0.05)
    paths.update(lora=root / "lora", layer1=root / "lora-layer1")
    return paths


def library_loaded(path, compressed=True):
    """The model transformers loads from a compressed-tensors checkpoint (decompressed by the library), or
    from a dense one."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kwargs = {"quantization_config": CompressedTensorsConfig(run_compressed=False)} if compressed else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path, device_map="cpu", **kwargs)


@pytest.mark.parametrize("kind", KINDS)
def test_decode_is_the_library_decompression(bases, kind):
    """Every quantized weight of every scheme decodes bit for bit as the library's per-module decompress."""
    path = bases[f"llama-ct-{kind}"]
    checkpoint, stored = Checkpoint.open(path), load_file(str(path / "model.safetensors"))
    assert len(checkpoint.groups) == (12 if kind == "nvfp4" else 14)  # NVFP4 leaves down_proj dense
    for param in checkpoint.groups:
        assert same(checkpoint.read(param), library_decompress(path, stored, param.removesuffix(".weight"))), param
    info = checkpoint.base_info()
    assert info.tensors[DOWN].shape == (128, 196) and info.tensors[DOWN].dtype == "BF16"
    assert not any(n.rpartition(".")[2].startswith("weight_") for n in info.tensors)


@pytest.mark.parametrize("bits", range(1, 9))
def test_unpack_is_the_library_unpack(bits):
    """Random int32 words, every width: our unpacking (minus the offset) is the library's ``unpack_from_int32``."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    torch.manual_seed(bits)
    for cols in (1, 7, 32, 61, 200):
        words = torch.randint(-2**31, 2**31 - 1, (5, -(-cols * bits // 32)), dtype=torch.int32)
        theirs = unpack_from_int32(words, bits, torch.Size((5, cols)))
        assert torch.equal(codec.unpack(words, bits, cols) - (1 << (bits - 1)), theirs.to(torch.int32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequantize_matches_the_library_on_random_scales(dtype):
    """Scales over a wide range in every dtype, asymmetric groups of 8-bit values: same bits as the library."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    from adaptools_plugins.compressed_tensors.layout import Layout, Scheme

    torch.manual_seed(3)
    q = torch.randint(-128, 128, (64, 96), dtype=torch.int8)
    zero = torch.randint(-128, 128, (64, 3), dtype=torch.int8)
    scale = (torch.randn(64, 3) * torch.exp2(torch.randint(-20, 10, (64, 3)).float())).abs().to(dtype)
    args = QuantizationArgs(num_bits=8, symmetric=False, strategy="group", group_size=32)
    theirs = dequantize(q, scale, zero, args)
    layout = Layout(Scheme("int-quantized", 8, "int", "group", False, 32), (64, 96), "", ())
    assert same(codec.dequantize(layout, q, scale, zero, dtype), theirs)


def library_state(path):
    """The checkpoint's tensors with every quantized module replaced by the library's decompression of it."""
    stored = load_file(str(path / "model.safetensors"))
    modules = {k.rpartition(".")[0] for k in stored if k.endswith(".weight_scale")}
    state = {k: v for k, v in stored.items() if k.rpartition(".")[0] not in modules or k.endswith(".bias")}
    state.update({f"{m}.weight": library_decompress(path, stored, m) for m in modules})
    return state


def library_model(bases, kind):
    """The original architecture holding the library's decompression of the ``kind`` checkpoint."""
    model = library_loaded(bases["llama-ct-dense"], compressed=False)
    model.load_state_dict(library_state(bases[f"llama-ct-{kind}"]))
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_dequantize_output_is_the_library_decompression_and_loads(bases, kind, tmp_path, cli_runner):
    """`adaptools dequantize`: every tensor bit for bit as the library decompresses it (others byte for byte),
    no quantization_config, and the output loads in transformers as a plain dense model."""
    path = bases[f"llama-ct-{kind}"]
    result = cli_runner("dequantize", path, tmp_path / "dense")
    assert result.exit_code == 0, result.output
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    ours, theirs = state_of(tmp_path / "dense"), library_state(path)
    assert sorted(ours) == sorted(theirs)
    assert all(same(value, theirs[key]) for key, value in ours.items())
    reloaded = library_loaded(tmp_path / "dense", compressed=False).state_dict()
    assert all(same(value, reloaded[key]) for key, value in ours.items())


@pytest.mark.parametrize("kind", ["int8"])
def test_dequantize_equals_transformers_loading_the_compressed_checkpoint(bases, kind, tmp_path):
    """transformers decompresses compressed checkpoints on load (through the library); 5.25 fails on
    llama-ct-pack and llama-ct-fp8 (CONVERSION errors on their mixed schemes), hence the library's own
    per-module decompress as the reference above."""
    merge(bases[f"llama-ct-{kind}"], [], tmp_path / "dense", operation="dequantize")
    ours, theirs = state_of(tmp_path / "dense"), library_loaded(bases[f"llama-ct-{kind}"]).state_dict()
    assert sorted(ours) == sorted(theirs) and all(same(value, theirs[key]) for key, value in ours.items())


@pytest.mark.parametrize("kind", KINDS)
def test_merge_equals_peft_on_the_library_dequantized_model(bases, kind, tmp_path):
    """Dequantize-merge (the default) against PEFT's merge_and_unload on the library-decompressed model."""
    from peft import PeftModel

    summary = merge(bases[f"llama-ct-{kind}"], [MergeInput(adaptools.load(bases["lora"]))], tmp_path / "m")
    assert summary.tensors_merged == 14
    ours = state_of(tmp_path / "m")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(library_model(bases, kind), bases["lora"]).merge_and_unload().state_dict()
    assert sorted(ours) == sorted(theirs)
    assert all(same(value, theirs[key]) for key, value in ours.items())


@pytest.mark.parametrize("kind", ["fp8", "int8", "nvfp4"])
def test_merge_requantize_is_the_library_compressor_on_the_dense_merge(bases, kind, tmp_path):
    """--requantize: changed weights are the library's compression (min-max qparams, ``compress``) of the
    dequantize-merged weights, byte for byte; untouched tensors byte for byte; the config unchanged; and the
    output decompresses through the library to our decode of it."""
    path, adapter = bases[f"llama-ct-{kind}"], adaptools.load(bases["layer1"])
    summary = merge(path, [MergeInput(adapter)], tmp_path / "rq", requantize=True)
    merge(path, [MergeInput(adapter)], tmp_path / "dense")
    ours, base, dense = state_of(tmp_path / "rq"), load_file(str(path / "model.safetensors")), state_of(
        tmp_path / "dense")
    assert sorted(ours) == sorted(base)
    changed = (Q.removesuffix(".weight"), GATE.removesuffix(".weight"))
    for key, value in base.items():
        if not key.startswith(changed):
            assert same(ours[key], value), key
    for module in changed:
        want = library_compress(path, dense[module + ".weight"], module)
        if module + ".input_global_scale" in base:  # NVFP4's activation scale: not the weight's, kept as stored
            want[module + ".input_global_scale"] = base[module + ".input_global_scale"]
        assert sorted(k for k in ours if k.startswith(module + ".")) == sorted(want)
        assert all(same(ours[k], v) for k, v in want.items()), module
        anchor = module + (".weight_packed" if kind == "nvfp4" else ".weight")
        assert not same(ours[anchor], base[anchor])
    assert sorted(s["tensor"] for s in summary.survival) == [GATE, Q]
    assert json.loads((tmp_path / "rq" / "config.json").read_text()) == json.loads((path / "config.json").read_text())
    checkpoint = Checkpoint.open(tmp_path / "rq")
    for module in changed:
        assert same(library_decompress(path, ours, module), checkpoint.read(module + ".weight"))


def test_requantize_into_packed_weights_is_refused(bases, tmp_path, cli_runner):
    result = cli_runner("merge", bases["llama-ct-pack"], bases["layer1"], tmp_path / "rq", "--requantize")
    assert result.exit_code == 2 and "calibrated" in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "rq").exists()


@pytest.mark.parametrize("case", ["global-zero", "global-nan", "scale-negative", "scale-grid", "global-missing"])
def test_hostile_nvfp4_checkpoints_end_in_one_clean_error(bases, case, tmp_path, cli_runner):
    import shutil

    m = "model.layers.0.self_attn.q_proj"
    edits = {
        "global-zero": lambda s: s[f"{m}.weight_global_scale"].fill_(0.0),
        "global-nan": lambda s: s[f"{m}.weight_global_scale"].fill_(float("nan")),
        "scale-negative": lambda s: s[f"{m}.weight_scale"].view(torch.uint8).__ior__(0x80),  # the sign bit
        "scale-grid": lambda s: s.update({f"{m}.weight_scale": s[f"{m}.weight_scale"][:, :4].clone()}),
        "global-missing": lambda s: s.pop(f"{m}.weight_global_scale"),
    }
    path = tmp_path / "base"
    shutil.copytree(bases["llama-ct-nvfp4"], path)
    state = {k: v.clone() for k, v in load_file(str(path / "model.safetensors")).items()}
    edits[case](state)
    (path / "model.safetensors").unlink()
    adaptools.plugin.save_tensors(path / "model.safetensors", state, {"format": "pt"})
    result = cli_runner("dequantize", path, tmp_path / "out")
    assert result.exit_code == 2 and m in result.stderr and "Traceback" not in result.output, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_merge_base_original(bases, kind, tmp_path, cli_runner):
    """The delta lands on the bf16 original; with --requantize every module the base's config quantizes is the
    library's compression of that merge, the rest as merged, and the base's quantization_config is kept."""
    base, lora, original = bases[f"llama-ct-{kind}"], bases["lora"], bases["llama-ct-dense"]
    result = cli_runner("merge", base, lora, tmp_path / "orig", "--merge-base", "original", "--original-base", original)
    assert result.exit_code == 0, result.output
    assert cli_runner("merge", original, lora, tmp_path / "direct").exit_code == 0
    merged, direct = state_of(tmp_path / "orig"), state_of(tmp_path / "direct")
    assert sorted(merged) == sorted(direct) and all(same(merged[k], direct[k]) for k in merged)
    result = cli_runner("merge", base, lora, tmp_path / "q", "--merge-base", "original", "--original-base", original,
                        "--requantize")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config == json.loads((base / "config.json").read_text())["quantization_config"]
    ours, stored = state_of(tmp_path / "q"), load_file(str(base / "model.safetensors"))
    assert sorted(ours) == sorted(stored)
    for param, value in merged.items():
        module = param.removesuffix(".weight")
        want = library_compress(base, value, module) if f"{module}.weight_scale" in stored else {param: value}
        assert all(same(ours[k], v) for k, v in want.items()), param


def test_merge_base_original_requantize_refuses_packed_bases_and_requantize_needs_a_base(bases, tmp_path,
                                                                                        cli_runner):
    result = cli_runner("merge", bases["llama-ct-pack"], bases["lora"], tmp_path / "q", "--merge-base", "original",
                        "--original-base", bases["llama-ct-dense"], "--requantize")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    result = cli_runner("requantize", bases["llama-ct-dense"], tmp_path / "r", "--quant-type", "ct_fp8")
    assert result.exit_code == 2 and "compressed-tensors base" in result.stderr, result.output
    assert not (tmp_path / "q").exists() and not (tmp_path / "r").exists()


def test_plugins_lists_the_backends(cli_runner):
    out = cli_runner("plugins").stdout
    assert all(name in out for name in ("ct_pack", "ct_fp8", "ct_int8", "ct_nvfp4"))
