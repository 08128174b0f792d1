"""MXFP4 bases (``quant_method: mxfp4``, gpt-oss): decoding against transformers' own dequantization bit for bit,
dequantize and dequantize-merge against transformers and PEFT, the refusal of --requantize, hostile files."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from conftest import FIXTURES
from safetensors.torch import load_file, save_file

from adaptools.checkpoint import Checkpoint
from adaptools_plugins.mxfp4 import codec

sys.path.insert(0, str(FIXTURES))
import build_mxfp4  # noqa: E402

GATE_UP = "model.layers.0.mlp.experts.gate_up_proj"


@pytest.fixture(scope="module")
def mx(tmp_path_factory):
    return build_mxfp4.build(tmp_path_factory.mktemp("mxfp4"))


def _state(folder):
    return load_file(str(folder / "model.safetensors"))


def _bits(t):
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _every_code_and_exponent(experts, rows, groups):
    """Seeded random bytes (every code occurs) and scales cycling through all 256 exponent bytes."""
    gen = torch.Generator().manual_seed(7)
    blocks = torch.randint(0, 256, (experts, rows, groups, 16), generator=gen, dtype=torch.uint8)
    scales = (torch.arange(experts * rows * groups) % 256).to(torch.uint8).reshape(experts, rows, groups)
    return blocks, scales


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(3, 256, 2), (2, 257, 3), (1, 1, 1), (5, 3, 7)])
def test_decode_equals_transformers_convert_moe_packed_tensors(dtype, shape):
    """Every code and every exponent byte (0 to 255, overflow and subnormals included), as bits; odd row and
    group counts for the transposed write."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = _every_code_and_exponent(*shape)
    if shape == (3, 256, 2):  # each exponent byte in each group, for every code
        scales = torch.arange(256, dtype=torch.int32).to(torch.uint8).repeat(3, 2, 1).transpose(1, 2).contiguous()
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    ours = codec.dequantize(blocks, scales, dtype)
    assert ours.shape == theirs.shape == (shape[0], shape[2] * 32, shape[1]) and ours.dtype == dtype
    assert torch.equal(_bits(ours), _bits(theirs))


def _power_rounded_to_dtype_first(dtype):
    values = torch.tensor(codec.FP4_VALUES, dtype=dtype).reshape(1, 16)
    return values * torch.pow(2.0, torch.arange(256.0) - codec.BIAS).to(dtype).reshape(256, 1)


def _product_of_fp32_power(dtype):  # torch.ldexp's documented formula: 0 x 2**128 = 0 x inf = NaN
    values = torch.tensor(codec.FP4_VALUES, dtype=dtype).reshape(1, 16)
    return (values * torch.pow(2.0, torch.arange(256, dtype=torch.int32) - codec.BIAS).reshape(256, 1)).to(dtype)


@pytest.mark.parametrize("wrong", [_power_rounded_to_dtype_first, _product_of_fp32_power])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_bit_comparison_catches_a_wrong_value_table(dtype, wrong, monkeypatch):
    """The decode test's inputs tell torch.ldexp from two plausible stand-ins (docs/mxfp4.md, "Decoding
    fast"): a codec whose value table is built another way does not pass it."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    monkeypatch.setattr(codec, "value_table", wrong)
    blocks, scales = _every_code_and_exponent(2, 257, 3)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    assert not torch.equal(_bits(codec.dequantize(blocks, scales, dtype)), _bits(theirs))


def test_checkpoint_sees_dense_expert_parameters(mx):
    checkpoint = Checkpoint.open(mx["gptoss-mxfp4"])
    info = checkpoint.base_info()
    assert info.tensors[GATE_UP].shape == (4, 64, 64) and info.tensors[GATE_UP].dtype == "BF16"
    assert info.tensors["model.layers.0.mlp.experts.down_proj"].shape == (4, 32, 64)
    assert not any(n.endswith(("_blocks", "_scales")) for n in info.tensors)
    assert {b.name for b, _ in checkpoint.groups.values()} == {"mxfp4"}


def test_dequantize_equals_transformers_dequantized_model(mx, tmp_path, cli_runner):
    """Every tensor bit for bit against the model transformers builds from the MXFP4 folder on the CPU, and the
    output is a plain dense checkpoint transformers loads."""
    result = cli_runner("dequantize", mx["gptoss-mxfp4"], tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    ours, theirs = _state(tmp_path / "out"), _state(mx["gptoss-mxfp4-dequantized"])
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16).state_dict()
    assert torch.equal(loaded[GATE_UP], theirs[GATE_UP])


def test_dequantize_merge_equals_peft_on_the_dequantized_model(mx, tmp_path, cli_runner):
    """An MoE-expert LoRA (target_parameters) lands on the MXFP4 experts as PEFT's merge_and_unload does on
    the dequantized bf16 model, bit for bit (the delta rounded to bf16 first, as PEFT's ParamWrapper does)."""
    result = cli_runner("merge", mx["gptoss-mxfp4"], mx["gptoss-mxfp4-lora"], tmp_path / "out")
    assert result.exit_code == 0, result.output
    ours, theirs = _state(tmp_path / "out"), _state(mx["gptoss-mxfp4-lora-peft-merged"])
    dense = _state(mx["gptoss-mxfp4-dequantized"])
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    assert not torch.equal(theirs[GATE_UP], dense[GATE_UP]), "PEFT changed no expert: the test proves nothing"


def test_requantize_is_refused_clearly(mx, tmp_path, cli_runner):
    result = cli_runner("merge", mx["gptoss-mxfp4"], mx["gptoss-mxfp4-lora"], tmp_path / "out", "--requantize")
    assert result.exit_code == 2 and "no reference MXFP4 quantizer runs on the CPU" in result.output
    assert str(mx["gptoss-mxfp4"] / "model.safetensors") in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_plugins_lists_the_backends(cli_runner):
    result = cli_runner("plugins")
    assert "backends: mxfp4, mxfp4_fp16, mxfp4_fp32" in result.output, result.output


def _hostile(mx, tmp_path, change):
    folder = tmp_path / "hostile"
    shutil.copytree(mx["gptoss-mxfp4"], folder)
    state = _state(folder)
    change(state)
    save_file(state, str(folder / "model.safetensors"), {"format": "pt"})
    if change is _f16_overflow:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "dtype": "float16", "torch_dtype": "float16"}))
    return folder


def _nan_scale(state):
    state[GATE_UP + "_scales"][1, 3, 0] = 255


def _huge_scale(state):
    state[GATE_UP + "_scales"][0, 0, 1] = 254


def _truncated_blocks(state):
    state[GATE_UP + "_blocks"] = state[GATE_UP + "_blocks"][:, :, :1].contiguous()


def _no_scales(state):
    del state[GATE_UP + "_scales"]


def _float_blocks(state):
    state[GATE_UP + "_blocks"] = state[GATE_UP + "_blocks"].to(torch.bfloat16)


def _f16_overflow(state):  # finite in bf16, not in a float16 model (config.json's dtype, set below)
    state[GATE_UP + "_scales"][2, 5, 1] = 145


def _narrow_blocks(state):
    state[GATE_UP + "_blocks"] = state[GATE_UP + "_blocks"][..., :8].contiguous()


@pytest.mark.parametrize(("change", "says"), [
    (_nan_scale, "NaN or infinite"), (_huge_scale, "NaN or infinite"), (_truncated_blocks, "must be U8"),
    (_no_scales, "without"), (_float_blocks, "MXFP4 blocks are U8"), (_narrow_blocks, "MXFP4 blocks are U8"),
    (_f16_overflow, "too large for float16"),
])
def test_hostile_checkpoints_are_refused_in_one_line(mx, tmp_path, cli_runner, change, says):
    """Exponent 255 (NaN in the format), one too large for bf16, blocks that do not match their scales, half a
    pair, float blocks, short blocks: exit 2, one line naming the file and tensor, nothing written."""
    folder = _hostile(mx, tmp_path, change)
    for args in (("dequantize", folder, tmp_path / "a"), ("merge", folder, mx["gptoss-mxfp4-lora"], tmp_path / "b")):
        result = cli_runner(*args)
        assert result.exit_code == 2, result.output
        assert says in result.output and "gate_up_proj" in result.output and "Traceback" not in result.output
        assert str(folder / "model.safetensors") in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_check_against_the_mxfp4_base(mx, tmp_path, cli_runner):
    """check sees the dequantized experts' shapes: clean for the right adapter, LORA024 for one whose r makes
    the factors hold 8 experts where the base has 4."""
    result = cli_runner("check", mx["gptoss-mxfp4-lora"], "--base", mx["gptoss-mxfp4"])
    assert result.exit_code == 0 and "0 finding(s)" in result.output, result.output
    liar = tmp_path / "liar"
    shutil.copytree(mx["gptoss-mxfp4-lora"], liar)
    config = json.loads((liar / "adapter_config.json").read_text())
    config["r"] = 1
    (liar / "adapter_config.json").write_text(json.dumps(config))
    result = cli_runner("check", liar, "--base", mx["gptoss-mxfp4"])
    assert "LORA024" in result.output and "8 experts" in result.output, result.output


def test_an_fp8_tensor_no_backend_decodes_is_not_passed_into_a_dense_output(mx, tmp_path, cli_runner):
    """An FP8 linear (weight + weight_scale_inv) in an MXFP4 checkpoint: no backend of this checkpoint reads
    it, and a dense output without quantization_config would hold its raw fp8 codes, its scales ignored."""
    name = "model.layers.0.self_attn.k_proj.weight"

    def fp8_linear(state):
        state[name] = state[name].to(torch.float8_e4m3fn)
        state[name + "_scale_inv"] = torch.ones(1, 1)
    folder = _hostile(mx, tmp_path, fp8_linear)
    for args in (("dequantize", folder, tmp_path / "a"), ("merge", folder, mx["gptoss-mxfp4-lora"], tmp_path / "b")):
        result = cli_runner(*args)
        assert result.exit_code == 2 and name in result.output and "F8_E4M3" in result.output, result.output
        assert str(folder / "model.safetensors") in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
