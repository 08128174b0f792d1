"""LLM.int8 (bitsandbytes 8-bit) bases: decode as bitsandbytes, encode byte for byte as bitsandbytes, and the
merge operations on an 8-bit checkpoint compared with transformers, PEFT and bitsandbytes."""

from __future__ import annotations

import json
import logging
import shutil
import sys

import pytest
import torch
from conftest import FIXTURES, adapter_path, base_path
from peft_oracle import load_base, logits
from safetensors.torch import load_file

import adaptools
from adaptools import MergeInput, merge
from adaptools.checkpoint import Checkpoint
from adaptools_plugins.bitsandbytes import int8 as int8

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
INT8_BASE = base_path("llama-int8")
PARAMS = sorted(k for k in load_file(str(INT8_BASE / "model.safetensors")) if k.endswith("proj.weight"))


def state_of(folder):
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def bnb_quantize(weight):
    """What transformers calls when it quantizes a weight: ``Int8Params(...).to(device)``."""
    import bitsandbytes as bnb

    param = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
    return param.data, param.SCB


def bnb_dequantize(codes, scb):
    import bitsandbytes.functional as F

    return F.int8_vectorwise_dequant(codes, scb)


@pytest.fixture(scope="module")
def int8_bases(tmp_path_factory):
    """The llama base quantized by transformers + bitsandbytes in a bf16 and an fp32 model."""
    sys.path.insert(0, str(FIXTURES))
    from build_int8 import save_int8_base

    root = tmp_path_factory.mktemp("int8")
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        save_int8_base(FIXTURES / "bases", root / name, dtype)
        out[name] = root / name
    return out


# --- the codec ------------------------------------------------------------------------------------------


def samples():
    gen = torch.Generator().manual_seed(8)
    for shape, dtype in [((96, 128), torch.float32), ((33, 65), torch.bfloat16), ((7, 3), torch.float16),
                         ((1, 1), torch.float32), ((300, 40), torch.float32)]:
        w = torch.randn(shape, generator=gen) * 0.05
        w[0] = 0.0  # an all-zero row: bitsandbytes casts a NaN there
        if shape[1] >= 3 and shape[0] > 2:
            w[2, :3] = torch.tensor([1.0, 0.5 / 127, 2.5 / 127])  # exact ties after scaling: half to even
        if shape[0] > 3:
            w[3, 0] = 60000.0  # near fp16's limit
        yield w.to(dtype)


def test_encode_is_byte_identical_to_bitsandbytes():
    for w in samples():
        codes, scb = int8.quantize_int8(w)
        want_codes, want_scb = bnb_quantize(w)
        assert torch.equal(codes, want_codes) and torch.equal(scb, want_scb), (w.shape, w.dtype)
        import bitsandbytes.functional as F

        direct = F.int8_vectorwise_quant(w.to(torch.float16))
        assert torch.equal(direct[0], codes) and torch.equal(direct[1], scb)


def test_encode_casts_to_fp16_first():
    """Quantizing the fp32 values directly changes codes: the fp16 cast is part of the format."""
    w = next(samples())
    codes, _ = int8.quantize_int8(w)
    scb = w.abs().amax(1)
    direct = torch.round(w * (127.0 / scb[:, None])).nan_to_num(0).to(torch.int8)
    assert not torch.equal(direct, codes)


def test_decode_is_bitsandbytes_dequant_and_the_order_matters():
    stored = load_file(str(INT8_BASE / "model.safetensors"))
    other_order = 0
    for param in PARAMS:
        codes, scb = stored[param], stored[param.removesuffix(".weight") + ".SCB"]
        ours = int8.dequantize_int8(codes, scb)
        assert torch.equal(ours, bnb_dequantize(codes, scb)), param
        other_order += int((codes * (scb.view(-1, 1) / 127)).ne(ours).sum())
    assert other_order > 0  # so the comparison above can fail


def test_fixture_reencodes_byte_for_byte():
    """Quantizing the original weights reproduces the file transformers wrote, and decoding round-trips."""
    stored = load_file(str(INT8_BASE / "model.safetensors"))
    original = load_base(base_path("llama")).state_dict()
    assert len(PARAMS) == 14
    for param in PARAMS:
        group = int8.Int8("F16").encode_group(param, original[param], {})
        module = param.removesuffix(".weight")
        assert sorted(group) == [f"{module}.SCB", param, f"{module}.weight_format"]
        for key, value in group.items():
            assert value.dtype == stored[key].dtype and torch.equal(value, stored[key]), key
        again, _ = int8.quantize_int8(int8.dequantize_int8(group[param], group[f"{module}.SCB"]))
        assert torch.equal(again, group[param])  # quant(deq(q)) == q


def test_encode_refuses_values_fp16_cannot_hold():
    with pytest.raises(adaptools.InputError, match="float16's range"):
        int8.quantize_int8(torch.tensor([[1.0, 70000.0]]), "x.weight")
    with pytest.raises(adaptools.InputError, match="NaN"):
        int8.quantize_int8(torch.tensor([[1.0, float("nan")]]), "x.weight")
    with pytest.raises(adaptools.InputError, match="2-D"):
        int8.quantize_int8(torch.ones(3), "x.weight")


# --- reading an 8-bit checkpoint ------------------------------------------------------------------------


def test_checkpoint_sees_dense_parameters_of_the_model_dtype(int8_bases):
    for path, backend, dtype in [(INT8_BASE, "int8", "F16"), (int8_bases["bf16"], "int8_bf16", "BF16"),
                                 (int8_bases["fp32"], "int8_fp32", "F32")]:
        checkpoint = Checkpoint.open(path)
        assert sorted(checkpoint.groups) == PARAMS
        assert {b.name for b, _ in checkpoint.groups.values()} == {backend}
        info = checkpoint.base_info()
        assert info.tensors["model.layers.0.mlp.down_proj.weight"].shape == (64, 128)
        assert {info.tensors[p].dtype for p in PARAMS} == {dtype}
        assert not any(n.endswith((".SCB", ".weight_format")) for n in info.tensors)


@pytest.mark.parametrize("which", ["fp16", "bf16", "fp32"])
def test_dequantize_equals_transformers_dequantize(which, int8_bases, tmp_path, cli_runner):
    from transformers import AutoModelForCausalLM

    base = INT8_BASE if which == "fp16" else int8_bases[which]
    result = cli_runner("dequantize", base, tmp_path / "dense")
    assert result.exit_code == 0, result.output
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    ours = state_of(tmp_path / "dense")
    theirs = AutoModelForCausalLM.from_pretrained(base, device_map="cpu").dequantize().state_dict()
    assert sorted(ours) == sorted(k for k in theirs if k != "lm_head.weight")  # tied, not stored
    for key, value in ours.items():
        assert value.dtype == theirs[key].dtype and torch.equal(value, theirs[key]), key


def test_merge_equals_peft_on_the_dequantized_model(tmp_path):
    """Dequantize-merge (the default) against PEFT's merge_and_unload on transformers' dequantized model."""
    from transformers import AutoModelForCausalLM

    summary = merge(INT8_BASE, [MergeInput(adaptools.load(adapter_path("llama-lora")))], tmp_path / "m")
    assert summary.tensors_merged == 14
    ours = state_of(tmp_path / "m")
    dequantized = AutoModelForCausalLM.from_pretrained(INT8_BASE, device_map="cpu").dequantize()
    with pytest.MonkeyPatch.context():
        import warnings

        warnings.simplefilter("ignore")
        from peft import PeftModel

        theirs = PeftModel.from_pretrained(dequantized, adapter_path("llama-lora")).merge_and_unload().state_dict()
    for key, value in ours.items():
        assert value.dtype == torch.float16 and torch.equal(value, theirs[key]), key
    # and the same as dequantizing first and merging the dense result
    merge(INT8_BASE, [], tmp_path / "dense", operation="dequantize")
    merge(tmp_path / "dense", [MergeInput(adaptools.load(adapter_path("llama-lora")))], tmp_path / "two-step")
    two_step = state_of(tmp_path / "two-step")
    assert all(torch.equal(ours[k], two_step[k]) for k in ours)


@pytest.fixture(scope="module")
def requantized(tmp_path_factory):
    out = tmp_path_factory.mktemp("rq")
    adapter = adaptools.load(adapter_path("llama-layers"))  # q_proj and o_proj of layer 1 only
    summary = merge(INT8_BASE, [MergeInput(adapter)], out / "rq", requantize=True)
    merge(INT8_BASE, [MergeInput(adapter)], out / "dense")
    return out, summary


def test_merge_requantize_is_bitsandbytes_quantization_of_the_dense_merge(requantized):
    out, summary = requantized
    ours, base, dense = state_of(out / "rq"), load_file(str(INT8_BASE / "model.safetensors")), state_of(out / "dense")
    assert sorted(ours) == sorted(base)
    touched = ("model.layers.1.self_attn.o_proj.", "model.layers.1.self_attn.q_proj.")
    for key, value in base.items():
        if not key.startswith(touched):
            assert torch.equal(ours[key], value), key  # untouched: byte for byte
    for module in touched:
        codes, scb = bnb_quantize(dense[module + "weight"])
        assert torch.equal(ours[module + "weight"], codes) and torch.equal(ours[module + "SCB"], scb), module
        assert not torch.equal(ours[module + "weight"], base[module + "weight"])
        assert ours[module + "weight_format"].dtype == torch.uint8 and int(ours[module + "weight_format"]) == 0
    assert sorted(s["tensor"] for s in summary.survival) == sorted(m + "weight" for m in touched)
    assert json.loads((out / "rq" / "config.json").read_text())["quantization_config"] == json.loads(
        (INT8_BASE / "config.json").read_text())["quantization_config"]


def test_requantized_output_loads_in_transformers_8bit(requantized):
    from transformers import AutoModelForCausalLM

    out, _ = requantized
    model = AutoModelForCausalLM.from_pretrained(out / "rq", device_map="cpu")
    layer = model.model.layers[1].self_attn.q_proj
    assert type(layer).__name__ == "Linear8bitLt"
    written = state_of(out / "rq")
    assert torch.equal(layer.weight.data, written["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(layer.weight.SCB, written["model.layers.1.self_attn.q_proj.SCB"])
    assert torch.isfinite(logits(model)).all()  # LLM.int8's forward also quantizes activations: no closer test


def test_requantize_in_an_fp32_model_equals_peft_merge_on_the_8bit_model(int8_bases, tmp_path):
    """PEFT's merge_and_unload on a loaded 8-bit model dequantizes in fp32, adds, and requantizes; in an fp32
    model that is what merge --requantize computes, byte for byte."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merge(int8_bases["fp32"], [MergeInput(adaptools.load(adapter_path("llama-lora")))], tmp_path / "rq",
          requantize=True)
    ours = state_of(tmp_path / "rq")
    model = AutoModelForCausalLM.from_pretrained(int8_bases["fp32"], device_map="cpu")
    theirs = PeftModel.from_pretrained(model, adapter_path("llama-lora")).merge_and_unload().state_dict()
    for key, value in ours.items():
        if value.dtype in (torch.int8, torch.float32) and key in theirs:
            assert torch.equal(value, theirs[key].to(value.device)), key


def test_survival_is_reported_and_a_lost_fine_tune_warned(tmp_path, cli_runner):
    result = cli_runner("merge", INT8_BASE, adapter_path("llama-lora"), tmp_path / "a", "--requantize", "--json")
    assert result.exit_code == 0, result.output
    survival = json.loads(result.stdout)["survival"]
    assert len(survival) == 14 and all(0.9 < s["retained"] < 1.1 for s in survival)
    assert json.loads(result.stdout)["survival_lost"] == []
    result = cli_runner("merge", INT8_BASE, adapter_path("llama-lora"), tmp_path / "b", "--requantize",
                        "--weight", "0.001")
    assert result.exit_code == 0 and "WARNING" in result.stderr
    result = cli_runner("merge", INT8_BASE, adapter_path("llama-lora"), tmp_path / "c", "--requantize",
                        "--weight", "0.001", "--json")
    data = json.loads(result.stdout)
    # --json names the same layers the warning does: those that kept less than half of their change
    lost = sorted(s["tensor"] for s in data["survival"] if s["retained"] < 0.5)
    assert lost and sorted(data["survival_lost"]) == lost


def test_perplexity_check_on_an_8bit_base(tmp_path, cli_runner):
    text = FIXTURES / "text" / "GPL-3.txt"
    result = cli_runner("merge", INT8_BASE, adapter_path("llama-lora"), tmp_path / "m", "--check", "perplexity",
                        "--eval-text", text, "--max-tokens", "400", "--json")
    assert result.exit_code in (0, 1), result.output
    check = json.loads(result.stdout)["checks"][0]
    assert check["figures"]["merged"] > 0 and check["figures"]["unmerged"] > 0


# --- what requantize --quant-type int8 needs from the backend -------------------------------------------


def transformers_8bit_modules(path, skip=None):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")
    return sorted(f"{n}.weight" for n, m in model.named_modules() if type(m).__name__ == "Linear8bitLt")


@pytest.mark.parametrize(("arch", "skip"), [("llama", None), ("qwen2", None), ("qwen2", ["o_proj"]),
                                            ("llama", ["model.layers.1", "mlp.up_proj"]),
                                            ("qwen2", [r"model\.layers\.\d\.mlp"])])
def test_quantized_weights_are_those_transformers_converts(arch, skip):
    """With the skip list our config writes, transformers builds Linear8bitLt for exactly our selection."""
    info = Checkpoint.open(base_path(arch)).base_info()
    ours = sorted(int8.quantized_weights(info.tensors, info.aliases, skip))
    written = int8.quantization_config(skip)["llm_int8_skip_modules"]
    assert ours == transformers_8bit_modules(base_path(arch), written)
    if skip:
        assert written[0] == "lm_head" and "lm_head.weight" in transformers_8bit_modules(base_path(arch), skip)


def test_quantization_config_is_what_transformers_writes():
    from transformers import BitsAndBytesConfig

    written = json.loads((INT8_BASE / "config.json").read_text())["quantization_config"]
    assert int8.Int8("F16").quantization_config({}, adaptools.QuantizeOptions()) == written
    skip = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head", "o_proj"],
                              llm_int8_threshold=4.0).to_dict()
    ours = int8.Int8("F16").quantization_config({"threshold": 4.0}, adaptools.QuantizeOptions(skip_modules=("o_proj",)))
    assert ours == {k: v for k, v in skip.items() if k in ours} and set(written) == set(ours)


def test_the_pieces_of_requantize_int8_rebuild_the_transformers_checkpoint(tmp_path):
    """Select, encode and describe as the engine will: the result is the file transformers wrote."""
    from transformers import AutoModelForCausalLM

    checkpoint = Checkpoint.open(base_path("llama"))
    info = checkpoint.base_info()
    backend = adaptools.plugin.get_backend("int8")
    state = {}
    for name in info.tensors:
        value = checkpoint.read(name)
        if name in int8.quantized_weights(info.tensors, info.aliases):
            state.update(backend.encode_group(name, value, backend.group_settings(name, checkpoint.read_small)))
        else:
            state[name] = value.to(torch.float16)
    theirs = load_file(str(INT8_BASE / "model.safetensors"))
    assert sorted(state) == sorted(theirs) and all(torch.equal(state[k], theirs[k]) for k in theirs)
    out = tmp_path / "q"
    shutil.copytree(INT8_BASE, out)
    adaptools.plugin.save_tensors(out / "model.safetensors", state, {"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = backend.quantization_config({}, adaptools.QuantizeOptions())
    (out / "config.json").write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear8bitLt"


def test_requantize_int8_writes_what_transformers_loads_as_8bit(tmp_path, cli_runner):
    """The engine's dense -> int8 path: codes are bitsandbytes' quantization of each linear weight."""
    from transformers import AutoModelForCausalLM

    result = cli_runner("requantize", base_path("llama"), tmp_path / "q", "--quant-type", "int8", "--json")
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu")
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear8bitLt"
    ours = {}
    for f in (tmp_path / "q").glob("*.safetensors"):
        ours.update(load_file(str(f)))
    dense = Checkpoint.open(base_path("llama"))
    name = "model.layers.0.mlp.up_proj.weight"
    codes, scb = int8.quantize_int8(dense.read(name))
    assert torch.equal(ours[name], codes) and torch.equal(ours["model.layers.0.mlp.up_proj.SCB"], scb)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["load_in_8bit"] is True


# --- hostile and sloppy checkpoints ---------------------------------------------------------------------


Q = "model.layers.0.self_attn.q_proj"


def broken(edit):
    def make(tmp):
        out = tmp / "base"
        shutil.copytree(INT8_BASE, out)
        state = {k: v.clone() for k, v in load_file(str(out / "model.safetensors")).items()}  # not the mmap
        edit(state)
        (out / "model.safetensors").unlink()
        adaptools.plugin.save_tensors(out / "model.safetensors", state, {"format": "pt"})
        return out
    return make


HOSTILE = {
    "scb-short": (broken(lambda s: s.update({f"{Q}.SCB": s[f"{Q}.SCB"][:-1].clone()})), f"{Q}.SCB"),
    "scb-half": (broken(lambda s: s.update({f"{Q}.SCB": s[f"{Q}.SCB"].half()})), f"{Q}.SCB"),
    "scb-nan": (broken(lambda s: s[f"{Q}.SCB"].__setitem__(3, float("nan"))), f"{Q}.SCB"),
    "scb-negative": (broken(lambda s: s[f"{Q}.SCB"].__setitem__(0, -1.0)), f"{Q}.SCB"),
    "weight-not-int8": (broken(lambda s: s.update({f"{Q}.weight": s[f"{Q}.weight"].half()})), f"{Q}.SCB"),
    "weight-missing": (broken(lambda s: s.pop(f"{Q}.weight")), f"{Q}.SCB"),
    "col32": (broken(lambda s: s.update({f"{Q}.weight_format": torch.tensor(1, dtype=torch.uint8)})),
              f"{Q}.weight_format"),
    "format-dtype": (broken(lambda s: s.update({f"{Q}.weight_format": torch.tensor([0, 0], dtype=torch.int32)})),
                     f"{Q}.weight_format"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_checkpoints_end_in_one_clean_error(case, tmp_path, cli_runner):
    make, tensor = HOSTILE[case]
    path = make(tmp_path)
    with pytest.raises(adaptools.InputError):
        Checkpoint.open(path)
    for command in (["dequantize", path, tmp_path / "out"], ["merge", path, adapter_path("llama-lora"),
                                                              tmp_path / "out", "--requantize"]):
        result = cli_runner(*command)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert str(path / "model.safetensors") in result.stderr and repr(tensor) in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_gpt2_style_8bit_checkpoints_are_refused(tmp_path, cli_runner):
    """transformers transposes Conv1D weights when quantizing: reading them as GPT-2's dense [in, out]
    layout would silently transpose square layers, so such checkpoints are refused."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(base_path("gpt2"), quantization_config=BitsAndBytesConfig(
        load_in_8bit=True), dtype=torch.float16, device_map="cpu")
    model.save_pretrained(tmp_path / "gpt2-int8")
    result = cli_runner("merge", tmp_path / "gpt2-int8", adapter_path("gpt2-lora"), tmp_path / "out")
    assert result.exit_code == 2 and "Conv1D" in result.stderr and not (tmp_path / "out").exists()


def test_a_missing_weight_format_reads_as_row_major(tmp_path):
    path = broken(lambda s: [s.pop(k) for k in list(s) if k.endswith("weight_format")])(tmp_path)
    checkpoint = Checkpoint.open(path)
    assert sorted(checkpoint.groups) == PARAMS
    assert torch.equal(checkpoint.read(f"{Q}.weight"), Checkpoint.open(INT8_BASE).read(f"{Q}.weight"))


def test_plugins_lists_the_backends(cli_runner):
    result = cli_runner("plugins")
    assert "int8, int8_bf16, int8_fp32" in result.stdout


# --- CUDA -----------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_bitsandbytes_agrees_with_the_cpu_rule():
    """bitsandbytes' CUDA kernel divides with __fdividef; count how often a code differs from the CPU rule."""
    import bitsandbytes.functional as F

    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(1024, 4096, generator=gen) * 0.02).half()
    codes, scb = int8.quantize_int8(w)
    cuda_codes, cuda_scb, _ = F.int8_vectorwise_quant(w.cuda())
    assert torch.equal(cuda_scb.cpu(), scb)
    differ = (cuda_codes.cpu().int() - codes.int()).abs()
    assert differ.max() <= 1 and differ.sum() <= 1e-4 * codes.numel()
    assert torch.equal(F.int8_vectorwise_dequant(codes.cuda(), scb.cuda()).cpu(), int8.dequantize_int8(codes, scb))
