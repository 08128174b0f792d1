"""GPTQ bases (``quant_method: gptq``): decode, dequantize, dequantize-merge and --requantize against the format's
rules (the fixture builder's plain decoder, itself proved against GPTQModel in test_gptq_oracle.py), transformers
and PEFT. Hostile checkpoints are in test_gptq_inputs.py."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from gptq_checks import VARIANTS, build_gptq, dense_loaded, modules_of, rule_state, same, state_of
from peft_oracle import seeded_lora
from safetensors.torch import load_file

import adaptools
from adaptools import MergeInput, merge
from adaptools.checkpoint import Checkpoint
from adaptools_plugins.gptq import codec

GATE = "model.layers.1.mlp.gate_proj"
Q = "model.layers.1.self_attn.q_proj"


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """The fp16 original, its GPTQ variants, and PEFT LoRAs on the original: every linear, and q_proj +
    gate_proj of layer 1."""
    from peft import LoraConfig

    root = tmp_path_factory.mktemp("gptq")
    paths = build_gptq.build(root)
    dense = paths["llama-gptq-dense"]
    seeded_lora(dense, LoraConfig(r=4, lora_alpha=8, target_modules=build_gptq.LINEARS), root / "lora", 5, 0.05)
    seeded_lora(dense, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"],
                                  layers_to_transform=[1]), root / "lora-layer1", 6, 0.05)
    paths.update(lora=root / "lora", layer1=root / "lora-layer1")
    return paths


@pytest.mark.parametrize("name", VARIANTS)
def test_decode_is_the_format_rule_bit_for_bit(bases, name):
    """Every GPTQ linear decodes bit for bit as the format's rule; the dense view has no GPTQ parts left."""
    path = bases[name]
    checkpoint, want = Checkpoint.open(path), rule_state(path)
    assert len(checkpoint.groups) == 14
    assert {checkpoint.groups[p][0].name for p in checkpoint.groups} == {
        "gptq" if build_gptq.VARIANTS[name][4] == "gptq" else "gptq_v2"}
    for param in checkpoint.groups:
        assert same(checkpoint.read(param), want[param]), param
    info = checkpoint.base_info()
    assert info.tensors[f"{GATE}.weight"].shape == (256, 128) and info.tensors[f"{GATE}.weight"].dtype == "F16"
    assert not any(n.endswith((".qweight", ".qzeros", ".scales", ".g_idx")) for n in info.tensors)


@pytest.mark.parametrize("cols", [5, 1])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_is_the_bit_stream_rule(bits, cols):
    """Random words, every width, one column too (odd strides): our unpacking and packing, along rows and
    columns, are the fixture builder's bit-stream rule."""
    torch.manual_seed(bits)
    words = torch.randint(-2**31, 2**31 - 1, (bits * 3, cols), dtype=torch.int32)
    codes = codec.unpack_rows(words, bits)
    assert codes.shape == (96, cols) and torch.equal(codes, build_gptq.unpack(words, bits))
    assert torch.equal(codec.pack_rows(codes, bits), words)
    assert torch.equal(codec.unpack_cols(words.t(), bits), codes.t())
    assert torch.equal(codec.pack_cols(codes.t(), bits), words.t())


def test_fp16_products_equal_fp32_products_rounded_once():
    """docs/gptq.md, "Precision": GPTQModel's torch kernel multiplies in fp16, its dequantizer in fp32 then
    rounds; for fp16 scales and code differences below 2^9 the two are the same bits (so is our decode)."""
    torch.manual_seed(0)
    scales = (torch.randn(4096) * torch.exp2(torch.randint(-24, 15, (4096,)).float())).to(torch.float16)
    diffs = torch.randint(-255, 256, (4096,))
    assert torch.equal((scales * diffs.to(torch.int16)), (scales.float() * diffs.float()).to(torch.float16))


@pytest.mark.parametrize("name", VARIANTS)
def test_dequantize_output_is_the_rule_and_loads(bases, name, tmp_path, cli_runner):
    """`adaptools dequantize`: every weight the rule's decode, every other tensor byte for byte, no
    quantization_config, and transformers loads it as a plain fp16 model holding exactly those values."""
    result = cli_runner("dequantize", bases[name], tmp_path / "dense")
    assert result.exit_code == 0, result.output
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    ours, want = state_of(tmp_path / "dense"), rule_state(bases[name])
    assert sorted(ours) == sorted(want) and all(same(v, want[k]) for k, v in ours.items())
    reloaded = dense_loaded(tmp_path / "dense").state_dict()
    assert all(same(value, reloaded[key]) for key, value in ours.items())


@pytest.mark.parametrize("name", VARIANTS)
def test_merge_equals_peft_on_the_dequantized_model(bases, name, tmp_path):
    """Dequantize-merge (the default) against PEFT's merge_and_unload on the dense model holding the decode."""
    from peft import PeftModel

    summary = merge(bases[name], [MergeInput(adaptools.load(bases["lora"]))], tmp_path / "m")
    assert summary.tensors_merged == 14
    ours = state_of(tmp_path / "m")
    model = dense_loaded(bases["llama-gptq-dense"], rule_state(bases[name]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(model, bases["lora"]).merge_and_unload().state_dict()
    assert sorted(ours) == sorted(theirs) and all(same(value, theirs[key]) for key, value in ours.items())
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())
    reloaded = dense_loaded(tmp_path / "m").state_dict()  # and transformers loads the output as it is
    assert all(same(value, reloaded[key]) for key, value in ours.items())


@pytest.mark.parametrize("name", VARIANTS)
def test_requantizing_an_unchanged_decode_gives_back_the_stored_qweight(bases, name):
    checkpoint = Checkpoint.open(bases[name])
    stored = load_file(str(bases[name] / "model.safetensors"))
    for param, (backend, _) in checkpoint.groups.items():
        settings = backend.group_settings(param, checkpoint.read_small)
        encoded = backend.encode_group(param, checkpoint.read(param), settings)
        module = param.removesuffix(".weight")
        assert sorted(encoded) == sorted(f"{module}.{p}" for p in ("qweight", "qzeros", "scales", "g_idx"))
        assert all(same(v, stored[k]) for k, v in encoded.items()), param


def _grid_codes(dense, stored, module, bits, v1):
    """The codes of ``dense`` on ``module``'s stored grid by GPTQModel's packing expression, written plainly."""
    zeros = build_gptq.unpack(stored[f"{module}.qzeros"].t(), bits).t().long()
    zeros = (zeros + 1) % (1 << bits) if v1 else zeros
    g = stored[f"{module}.g_idx"].long()
    scale = stored[f"{module}.scales"].float()[g]
    return torch.clamp(torch.round((dense.t().float() + zeros[g].float() * scale) / scale), 0, (1 << bits) - 1)


@pytest.mark.parametrize("name", VARIANTS)
def test_merge_requantize_rounds_onto_the_stored_grid(bases, name, tmp_path, cli_runner):
    """--requantize: each changed qweight is the dense merge rounded onto its stored grid; qzeros, scales, g_idx
    and every untouched tensor byte for byte; the config unchanged; the note says this is not GPTQ."""
    path = bases[name]
    bits, _, _, _, fmt = build_gptq.VARIANTS[name]
    result = cli_runner("merge", path, bases["layer1"], tmp_path / "rq", "--requantize")
    assert result.exit_code == 0, result.output
    assert "not GPTQ" in result.stderr and "docs/gptq.md" in result.stderr
    merge(path, [MergeInput(adaptools.load(bases["layer1"]))], tmp_path / "dense")
    ours, base, dense = state_of(tmp_path / "rq"), load_file(str(path / "model.safetensors")), state_of(
        tmp_path / "dense")
    assert sorted(ours) == sorted(base)
    for key, value in base.items():
        if not key.startswith((Q, GATE)) or not key.endswith(".qweight"):
            assert same(ours[key], value), key
    for module in (Q, GATE):
        codes = _grid_codes(dense[f"{module}.weight"], base, module, bits, fmt == "gptq").to(torch.int32)
        assert torch.equal(build_gptq.unpack(ours[f"{module}.qweight"], bits), codes), module
        assert not same(ours[f"{module}.qweight"], base[f"{module}.qweight"])
    assert json.loads((tmp_path / "rq" / "config.json").read_text()) == json.loads((path / "config.json").read_text())
    assert modules_of(ours) == modules_of(base)


def test_quantizing_dense_weights_to_gptq_is_refused(bases, tmp_path, cli_runner):
    """`requantize --quant-type gptq` and `merge --merge-base original --requantize` would have to quantize
    dense weights, which GPTQ does with calibration data: one line each, nothing written."""
    original = bases["llama-gptq-dense"]
    for command in (["requantize", original, tmp_path / "r", "--quant-type", "gptq"],
                    ["merge", bases["llama-gptq-4"], bases["lora"], tmp_path / "r", "--merge-base", "original",
                     "--original-base", original, "--requantize"]):
        result = cli_runner(*command)
        assert result.exit_code == 2 and "calibration" in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_merge_base_original_lands_the_delta_on_the_original(bases, tmp_path, cli_runner):
    result = cli_runner("merge", bases["llama-gptq-4"], bases["lora"], tmp_path / "orig", "--merge-base", "original",
                        "--original-base", bases["llama-gptq-dense"])
    assert result.exit_code == 0, result.output
    assert cli_runner("merge", bases["llama-gptq-dense"], bases["lora"], tmp_path / "direct").exit_code == 0
    merged, direct = state_of(tmp_path / "orig"), state_of(tmp_path / "direct")
    assert sorted(merged) == sorted(direct) and all(same(merged[k], direct[k]) for k in merged)


def test_plugins_lists_the_backends(cli_runner):
    out = cli_runner("plugins").stdout
    assert "adaptools_plugins.gptq" in out and "gptq_v2" in out
