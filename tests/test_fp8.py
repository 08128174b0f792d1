"""Fine-grained FP8 bases (``quant_method: fp8``): every operation on an FP8 checkpoint against transformers and
PEFT. The codec's own tests are in test_fp8_codec.py, hostile checkpoints in test_fp8_inputs.py."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from fp8_checks import build_fp8, reference_dequantize, same, state_of, transformers_dequantized
from peft_oracle import seeded_lora
from safetensors.torch import load_file

import adaptools
from adaptools import MergeInput, merge
from adaptools.checkpoint import Checkpoint
from adaptools_plugins.fp8 import codec

GATE = "model.layers.1.mlp.gate_proj.weight"  # partial tiles ([352, 256] in 128x128), an all-zero tile
Q = "model.layers.1.self_attn.q_proj.weight"  # whole tiles


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """llama-fp8-dense (the bf16 original), llama-fp8 (DeepSeek-style, partial tiles in FP8), llama-fp8-hf
    (transformers' own quantizer: partial-tile weights left bf16), llama-fp8-fp32 (the -hf one in fp32), and
    LoRA adapters made by PEFT on the original: every linear, and q_proj + gate_proj of layer 1."""
    from peft import LoraConfig

    root = tmp_path_factory.mktemp("fp8")
    paths = build_fp8.build(root)
    paths["llama-fp8-fp32"] = root / "llama-fp8-fp32"
    build_fp8.save_fp8_base(build_fp8.dense_model(torch.float32), paths["llama-fp8-fp32"], False,
                            build_fp8.transformers_config())
    linears = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    seeded_lora(paths["llama-fp8-dense"], LoraConfig(r=4, lora_alpha=8, target_modules=linears), root / "lora", 5,
                0.05)
    seeded_lora(paths["llama-fp8-dense"], LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"],
                                                     layers_to_transform=[1]), root / "lora-layer1", 6, 0.05)
    paths.update(lora=root / "lora", layer1=root / "lora-layer1")
    return paths


# --- reading an FP8 checkpoint --------------------------------------------------------------------------


def test_fixtures_are_our_encoding_of_the_original(bases):
    """Every stored FP8 weight of both fixtures is our encoder's output on the bf16 original."""
    original = load_file(str(bases["llama-fp8-dense"] / "model.safetensors"))
    for name, count in (("llama-fp8", 14), ("llama-fp8-hf", 8)):
        stored = load_file(str(bases[name] / "model.safetensors"))
        params = [k.removesuffix("_scale_inv") for k in stored if k.endswith("_scale_inv")]
        assert len(params) == count
        for param in params:
            q, scale_inv = codec.quantize(original[param], (128, 128))
            assert same(stored[param], q) and same(stored[param + "_scale_inv"], scale_inv), param


@pytest.mark.parametrize(("name", "backend", "dtype"), [("llama-fp8", "fp8", "BF16"), ("llama-fp8-hf", "fp8", "BF16"),
                                                        ("llama-fp8-fp32", "fp8_fp32", "F32")])
def test_checkpoint_sees_dense_parameters_of_the_model_dtype(bases, name, backend, dtype):
    checkpoint = Checkpoint.open(bases[name])
    assert {b.name for b, _ in checkpoint.groups.values()} == {backend}
    info = checkpoint.base_info()
    assert info.tensors[Q].shape == (256, 256) and info.tensors[Q].dtype == dtype
    assert not any(n.endswith("_scale_inv") for n in info.tensors)
    assert (GATE in checkpoint.groups) == (name == "llama-fp8")


def test_dequantize_equals_transformers_dequantized_model(bases, tmp_path, cli_runner):
    """The whole-tile checkpoints transformers reads: bf16 and fp32 models, every tensor bit for bit, and the
    output loads in transformers as a plain dense model equal to the dequantized one."""
    for name in ("llama-fp8-hf", "llama-fp8-fp32"):
        result = cli_runner("dequantize", bases[name], tmp_path / name)
        assert result.exit_code == 0, result.output
        assert "quantization_config" not in json.loads((tmp_path / name / "config.json").read_text())
        theirs = transformers_dequantized(bases[name]).state_dict()
        ours = state_of(tmp_path / name)
        assert sorted(ours) == sorted(theirs)
        assert all(same(value, theirs[key]) for key, value in ours.items())
        reloaded = transformers_dequantized(tmp_path / name).state_dict()
        assert all(same(value, theirs[key]) for key, value in reloaded.items())


def test_dequantize_reads_partial_tiles_that_transformers_refuses(bases, tmp_path, cli_runner):
    with pytest.raises(RuntimeError):
        transformers_dequantized(bases["llama-fp8"])  # "Weight shape (352, 256) not divisible by scale grid (3, 2)"
    result = cli_runner("dequantize", bases["llama-fp8"], tmp_path / "dense")
    assert result.exit_code == 0, result.output
    ours, stored = state_of(tmp_path / "dense"), load_file(str(bases["llama-fp8"] / "model.safetensors"))
    assert sorted(ours) == sorted(k for k in stored if not k.endswith("_scale_inv"))
    for key, value in ours.items():
        if key + "_scale_inv" in stored:
            want = reference_dequantize(stored[key], stored[key + "_scale_inv"], (128, 128), torch.bfloat16)
            assert same(value, want), key
        else:
            assert same(value, stored[key]), key  # untouched: byte for byte
    transformers_dequantized(tmp_path / "dense")  # and the dense result loads


def test_merge_equals_peft_on_the_dequantized_model(bases, tmp_path):
    """Dequantize-merge (the default) against PEFT's merge_and_unload on transformers' dequantized model."""
    from peft import PeftModel

    summary = merge(bases["llama-fp8-hf"], [MergeInput(adaptools.load(bases["lora"]))], tmp_path / "m")
    assert summary.tensors_merged == 14
    ours = state_of(tmp_path / "m")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(transformers_dequantized(bases["llama-fp8-hf"]), bases["lora"])
        theirs = model.merge_and_unload().state_dict()
    assert sorted(ours) == sorted(theirs)
    assert all(same(value, theirs[key]) for key, value in ours.items())


def test_merge_with_partial_tiles_is_dequantize_then_merge(bases, tmp_path):
    adapter = adaptools.load(bases["lora"])
    merge(bases["llama-fp8"], [MergeInput(adapter)], tmp_path / "direct")
    merge(bases["llama-fp8"], [], tmp_path / "dense", operation="dequantize")
    merge(tmp_path / "dense", [MergeInput(adapter)], tmp_path / "two-step")
    direct, two_step = state_of(tmp_path / "direct"), state_of(tmp_path / "two-step")
    assert sorted(direct) == sorted(two_step) and all(same(direct[k], two_step[k]) for k in direct)


# --- FP8 output -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def requantized(bases, tmp_path_factory):
    out = tmp_path_factory.mktemp("rq")
    adapter = adaptools.load(bases["layer1"])  # q_proj (whole tiles) and gate_proj (partial) of layer 1
    summary = merge(bases["llama-fp8"], [MergeInput(adapter)], out / "rq", requantize=True)
    merge(bases["llama-fp8"], [MergeInput(adapter)], out / "dense")
    return out, summary


def test_merge_requantize_is_the_quantizer_on_the_dense_merge(bases, requantized):
    out, summary = requantized
    ours, base, dense = state_of(out / "rq"), load_file(str(bases["llama-fp8"] / "model.safetensors")), state_of(
        out / "dense")
    assert sorted(ours) == sorted(base)
    for key, value in base.items():
        if not key.startswith((Q, GATE)):
            assert same(ours[key], value), key  # untouched: byte for byte
    for param in (Q, GATE):
        want = build_fp8.quantize(param, dense[param])  # transformers' quantizer (padded for gate's partial tiles)
        assert same(ours[param], want[param]) and same(ours[param + "_scale_inv"], want[param + "_scale_inv"])
        assert not same(ours[param], base[param])
    assert sorted(s["tensor"] for s in summary.survival) == [GATE, Q]
    assert all(0.9 < s["retained"] < 1.1 and s["codes_changed"] > 0.5 for s in summary.survival)
    assert json.loads((out / "rq" / "config.json").read_text())["quantization_config"] == build_fp8.DEEPSEEK_CONFIG


def test_survival_is_reported_and_a_lost_fine_tune_warned(bases, tmp_path, cli_runner):
    result = cli_runner("merge", bases["llama-fp8"], bases["lora"], tmp_path / "a", "--requantize", "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["survival"]) == 14
    result = cli_runner("merge", bases["llama-fp8"], bases["lora"], tmp_path / "b", "--requantize", "--weight", "0.001")
    assert result.exit_code == 0 and "WARNING" in result.stderr


def test_requantized_output_loads_in_transformers(bases, tmp_path):
    merge(bases["llama-fp8-hf"], [MergeInput(adaptools.load(bases["layer1"]))], tmp_path / "rq", requantize=True)
    written = state_of(tmp_path / "rq")
    loaded = transformers_dequantized(tmp_path / "rq").state_dict()
    assert same(loaded[Q], codec.dequantize(written[Q], written[Q + "_scale_inv"], (128, 128), torch.bfloat16))
    assert same(loaded[GATE], written[GATE])  # left dense by transformers' quantizer, merged in bf16


def test_merge_base_original(bases, tmp_path, cli_runner):
    """The delta lands on the bf16 original; with --requantize the output is quantized as transformers would
    (partial-tile weights left dense) and keeps the quantized base's quantization_config."""
    base, lora, original = bases["llama-fp8"], bases["lora"], bases["llama-fp8-dense"]
    result = cli_runner("merge", base, lora, tmp_path / "orig", "--merge-base", "original", "--original-base", original)
    assert result.exit_code == 0, result.output
    assert cli_runner("merge", original, lora, tmp_path / "direct").exit_code == 0
    a, b = state_of(tmp_path / "orig"), state_of(tmp_path / "direct")
    assert sorted(a) == sorted(b) and all(same(a[k], b[k]) for k in a)
    result = cli_runner("merge", base, lora, tmp_path / "orig8", "--merge-base", "original", "--original-base",
                        original, "--requantize")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "orig8" / "config.json").read_text())["quantization_config"] == \
        build_fp8.DEEPSEEK_CONFIG
    ours, stored = state_of(tmp_path / "orig8"), load_file(str(base / "model.safetensors"))
    for param, value in a.items():
        want = build_fp8.quantize(param, value, partial=False) if param + "_scale_inv" in stored else {param: value}
        assert sorted(k for k in ours if k.startswith(param)) == sorted(want), param
        assert all(same(ours[k], v) for k, v in want.items()), param


def test_requantize_a_dense_model_is_transformers_fp8_checkpoint(bases, tmp_path, cli_runner):
    """``adaptools requantize --quant-type fp8`` on the original reproduces llama-fp8-hf: same tensors, same
    bytes, transformers' own quantization_config."""
    result = cli_runner("requantize", bases["llama-fp8-dense"], tmp_path / "q", "--quant-type", "fp8")
    assert result.exit_code == 0, result.output
    ours, theirs = state_of(tmp_path / "q"), load_file(str(bases["llama-fp8-hf"] / "model.safetensors"))
    assert sorted(ours) == sorted(theirs) and all(same(ours[k], theirs[k]) for k in theirs)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"] == build_fp8.transformers_config()
    result = cli_runner("requantize", bases["llama-fp8-dense"], tmp_path / "b", "--quant-type", "fp8",
                        "--blocksize", "32")
    assert result.exit_code == 2 and "128x128" in result.stderr and not (tmp_path / "b").exists()


def test_quantization_config_is_what_transformers_writes():
    from transformers import FineGrainedFP8Config

    backend = adaptools.plugin.get_backend("fp8")
    options = adaptools.QuantizeOptions(quant_type="fp8", skip_modules=("o_proj",))
    ours = backend.quantization_config({"block": (128, 128)}, options)
    theirs = FineGrainedFP8Config(modules_to_not_convert=["lm_head", "o_proj"])
    assert ours == json.loads(theirs.to_json_string(use_diff=False))


def test_two_checkpoints_with_different_blocks_are_never_confused(bases, tmp_path):
    """Block sizes come from config.json, which the decoding hooks do not see: each checkpoint decodes with its
    own, and a weight read without its checkpoint, which two scans store with the same scale grid in different
    blocks, is refused rather than decoded with the wrong one."""
    other = tmp_path / "other"
    build_fp8.save_fp8_base(build_fp8.dense_model(), other, True, {"quant_method": "fp8",
                                                                  "weight_block_size": [160, 200]})
    first, second = Checkpoint.open(bases["llama-fp8"]), Checkpoint.open(other)
    for checkpoint, block in ((first, (128, 128)), (second, (160, 200))):
        stored = load_file(str(checkpoint.path / "model.safetensors"))
        want = reference_dequantize(stored[GATE], stored[GATE + "_scale_inv"], block, torch.bfloat16)
        assert same(checkpoint.read(GATE), want)  # [352, 256] makes a 3x2 grid in both blocks
        backend = checkpoint.groups[GATE][0]
        with pytest.raises(adaptools.InputError, match="different block sizes"):
            backend.decode_group(GATE, stored.__getitem__, [GATE + "_scale_inv"])


def test_plugins_lists_the_backends(cli_runner):
    assert "fp8, fp8_fp16, fp8_fp32" in cli_runner("plugins").stdout


@pytest.mark.gpu
def test_transformers_quantizing_on_cuda_writes_our_bytes(bases, tmp_path):
    """transformers quantizes on the fly only on a GPU: its saved checkpoint holds our encoder's bytes."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    model = AutoModelForCausalLM.from_pretrained(bases["llama-fp8-dense"], device_map="cuda",
                                                 quantization_config=FineGrainedFP8Config())
    model.save_pretrained(tmp_path / "q")
    theirs, ours = state_of(tmp_path / "q"), load_file(str(bases["llama-fp8-hf"] / "model.safetensors"))
    for key, value in ours.items():
        if key.endswith("_scale_inv"):
            param = key.removesuffix("_scale_inv")
            assert same(theirs[param], ours[param]) and same(theirs[key], value), param
