"""Hostile and unsupported FP8 checkpoints: each ends in one clear line naming what is wrong, exit code 2, and
nothing written, whether the command is ``dequantize`` or ``merge --requantize``."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from fp8_checks import build_fp8
from hostile_edits import edited, put, refused_in_one_line, truncated_is_refused
from safetensors.torch import load_file

import adaptools
from adaptools.checkpoint import Checkpoint

P = "model.layers.0.mlp.gate_proj.weight"  # [352, 256]: scale grid [3, 2]
S = P + "_scale_inv"


@pytest.fixture(scope="module")
def fp8_base(tmp_path_factory):
    from peft import LoraConfig
    from peft_oracle import seeded_lora

    root = tmp_path_factory.mktemp("fp8-inputs")
    paths = build_fp8.build(root)
    seeded_lora(paths["llama-fp8-dense"], LoraConfig(r=2, target_modules=["gate_proj"]), root / "lora", 3, 0.05)
    return paths["llama-fp8"], root / "lora"






def block(value):
    return lambda q: q.update({"weight_block_size": value})


#: case -> (tensor edit, config edit, what the one line must name)
HOSTILE = {
    "scale-nan": (lambda s: s[S].__setitem__((1, 1), float("nan")), None, S),
    "scale-zero": (lambda s: s[S].__setitem__((0, 0), 0.0), None, S),
    "scale-negative": (lambda s: s[S].__setitem__((2, 0), -0.001), None, S),
    "scale-inf": (lambda s: s[S].__setitem__((0, 1), float("inf")), None, S),
    "scale-grid": (put(S, lambda s: s[S][:2].clone()), None, S),
    "scale-f16": (put(S, lambda s: s[S].half()), None, S),
    "weight-short": (put(P, lambda s: s[P][:256].clone()), None, S),
    "weight-bf16": (put(P, lambda s: s[P].to(torch.bfloat16)), None, S),
    "weight-3d": (put(P, lambda s: s[P].view(torch.uint8).reshape(2, 176, 256).view(torch.float8_e4m3fn)), None, S),
    "weight-missing": (lambda s: s.pop(P), None, S),
    "scale-missing": (lambda s: s.pop(S), None, P),
    "static-activation": (put(P.removesuffix("weight") + "activation_scale", lambda s: torch.ones(1)), None,
                          "activation_scale"),
    "fused-experts": (put("model.layers.0.mlp.experts.gate_up_proj_scale_inv", lambda s: torch.ones(1, 1)), None,
                      "gate_up_proj_scale_inv"),
    "block-zero": (None, block([0, 128]), "weight_block_size"),
    "block-huge": (None, block([2**40, 128]), "weight_block_size"),
    "block-float": (None, block([1e30, 128]), "weight_block_size"),
    "block-one-number": (None, block([128]), "weight_block_size"),
    "block-text": (None, block(["128", 128]), "weight_block_size"),
    "block-bool": (None, block([True, 128]), "weight_block_size"),
    "block-null": (None, block(None), "weight_block_size"),
    "block-wrong": (None, block([64, 64]), "_scale_inv"),  # valid, but no stored grid fits it
    "ue8m0": (None, lambda q: q.update({"scale_fmt": "ue8m0"}), "scale_fmt"),
    "static-scheme": (None, lambda q: q.update({"activation_scheme": "static"}), "activation_scheme"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_checkpoints_end_in_one_clean_error(case, fp8_base, tmp_path, cli_runner):
    tensors, config, named = HOSTILE[case]
    base, lora = fp8_base
    path = edited(base, tmp_path, tensors, config)
    with pytest.raises(adaptools.InputError):
        Checkpoint.open(path)
    commands = (["dequantize", path, tmp_path / "out"], ["merge", path, lora, tmp_path / "out", "--requantize"])
    refused_in_one_line(cli_runner, path, named, commands, tmp_path / "out")


def test_a_truncated_file_is_refused(fp8_base, tmp_path, cli_runner):
    truncated_is_refused(cli_runner, fp8_base[0], tmp_path)


def _nan_code(state):
    state[P].view(torch.uint8)[3, 4] = 0x7F


#: case -> (tensor edit, config edit, what the one line must say): sound headers, values found only when decoded
READ_TIME = {
    # float8_e4m3fn has NaN codes (0x7F, 0xFF) and no infinity; the headers cannot show them, the decode does
    "nan-code": (_nan_code, None, "NaN codes"),
    "scale-overflows-bf16": (lambda s: s[S].__setitem__((0, 0), 3e38), None, "too large for bfloat16"),
    "scale-overflows-f16": (lambda s: s[S].__setitem__((0, 0), 1e3), "float16", "too large for float16"),
}


@pytest.mark.parametrize("case", sorted(READ_TIME))
def test_values_are_refused_when_read_naming_the_file(case, fp8_base, tmp_path, cli_runner):
    tensors, dtype, says = READ_TIME[case]
    path = edited(fp8_base[0], tmp_path, tensors)
    if dtype is not None:
        data = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**data, "dtype": dtype, "torch_dtype": dtype}))
    for command in (["dequantize", path, tmp_path / "out"], ["merge", path, fp8_base[1], tmp_path / "out"],
                    ["merge", path, fp8_base[1], tmp_path / "out", "--requantize"]):
        result = cli_runner(*command)
        assert result.exit_code == 2 and P in result.stderr and says in result.stderr, result.output
        assert str(path / "model.safetensors") in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def _sharded(base, tmp, change):
    """A copy of ``base`` in two shards with an index, the state and the index then edited by ``change``."""
    out = tmp / "base"
    shutil.copytree(base, out)
    state = {k: v.clone() for k, v in load_file(str(out / "model.safetensors")).items()}
    (out / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    change(state, shards)
    weight_map = {}
    for file, keys in shards.items():
        adaptools.plugin.save_tensors(out / file, {k: state[k] for k in keys}, {"format": "pt"})
        weight_map.update({k: file for k in keys})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def _duplicate_scale(state, shards):
    shards["model-00002-of-00002.safetensors"].append(S)  # the scale in both shards
    shards["model-00001-of-00002.safetensors"].append(S)


def _missing_shard(state, shards):
    shards["model-00003-of-00002.safetensors"] = []  # indexed, then deleted below


SHARDS = {"duplicate-across-shards": (_duplicate_scale, S), "index-names-a-missing-shard": (_missing_shard, "00003")}


@pytest.mark.parametrize("case", sorted(SHARDS))
def test_sharded_checkpoints_that_lie_are_refused(case, fp8_base, tmp_path, cli_runner):
    change, named = SHARDS[case]
    path = _sharded(fp8_base[0], tmp_path, change)
    for shard in path.glob("model-00003-*"):
        shard.unlink()
    if case == "index-names-a-missing-shard":  # an index entry for a shard that is not there
        index = json.loads((path / "model.safetensors.index.json").read_text())
        index["weight_map"][P] = "model-00003-of-00002.safetensors"
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    for command in (["dequantize", path, tmp_path / "out"], ["merge", path, fp8_base[1], tmp_path / "out"],
                    ["merge", path, fp8_base[1], tmp_path / "out", "--requantize"]):
        result = cli_runner(*command)
        assert result.exit_code == 2 and named in result.stderr and str(path) in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_an_fp8_config_without_fp8_tensors_is_not_a_quantized_checkpoint(fp8_base, tmp_path, cli_runner):
    dense = tmp_path / "dense"
    shutil.copytree(fp8_base[0].parent / "llama-fp8-dense", dense)
    config = json.loads((dense / "config.json").read_text())
    config["quantization_config"] = build_fp8.DEEPSEEK_CONFIG
    (dense / "config.json").write_text(json.dumps(config))
    result = cli_runner("dequantize", dense, tmp_path / "out")
    assert result.exit_code == 2 and "nothing to dequantize" in result.stderr
