"""Hostile and unsupported AWQ checkpoints: each ends in one clear line naming the file and what is wrong, exit
code 2, no traceback and nothing written, whether the command is ``dequantize`` or ``merge``."""

from __future__ import annotations

import pytest
import torch
from awq_checks import build_awq
from hostile_edits import conf, edited, put, setitem, truncated_is_refused
from safetensors.torch import load_file

import adaptools
from adaptools.checkpoint import Checkpoint

M = "model.layers.0.mlp.down_proj"  # 192 inputs in 6 groups of 32, 128 outputs: qweight [192, 16], scales [6, 128]
W, Z, S = f"{M}.qweight", f"{M}.qzeros", f"{M}.scales"


@pytest.fixture(scope="module")
def awq_bases(tmp_path_factory):
    from peft import LoraConfig
    from peft_oracle import seeded_lora

    root = tmp_path_factory.mktemp("awq-inputs")
    paths = build_awq.build(root)
    seeded_lora(paths["llama-awq-dense"], LoraConfig(r=2, target_modules=["down_proj", "q_proj"]), root / "lora", 3,
                0.05)
    return paths["llama-awq"], root / "lora"










#: case -> (tensor edit, config edit, what the one line must name: a string, or a tuple of them)
HOSTILE = {
    "scale-nan": (setitem(S, (1, 1), float("nan")), None, S),
    "scale-zero": (setitem(S, (0, 0), 0.0), None, (S, "zero")),
    "scale-inf": (setitem(S, (2, 5), float("inf")), None, S),
    "scale-negative": (setitem(S, (3, 0), -0.01), None, S),
    "scale-bf16": (put(S, lambda s: s[S].to(torch.bfloat16)), None, S),
    "scale-missing": (lambda s: s.pop(S), None, S),
    "qweight-truncated": (put(W, lambda s: s[W][:160].clone()), None, (W, S)),  # whole groups: scales disagree
    "qweight-ragged": (put(W, lambda s: s[W][:170].clone()), None, W),  # not whole groups of 32
    "qweight-narrow": (put(W, lambda s: s[W][:, :15].clone()), None, (W, S)),
    "qweight-3d": (put(W, lambda s: s[W].reshape(2, 96, 16).clone()), None, W),
    "qweight-int8": (put(W, lambda s: s[W].view(torch.int8)), None, W),
    "qweight-missing": (lambda s: s.pop(W), None, W),
    "out-not-multiple-of-8": (put(S, lambda s: s[S][:, :100].clone()), None, (S, "multiple of 8")),
    "scales-lie-groups": (put(S, lambda s: s[S][:3].clone()), None, (W, S, "3 groups")),
    "qzeros-shape": (put(Z, lambda s: s[Z][:, :8].clone()), None, Z),
    "qzeros-float": (put(Z, lambda s: s[Z].view(torch.float32)), None, Z),
    "dense-and-packed": (put(f"{M}.weight", lambda s: torch.zeros(128, 192, dtype=torch.float16)), None,
                         f"{M}.weight"),
    # down_proj (192 inputs) is checked first
    "group-not-dividing-in": (None, conf(group_size=40), (W, "no whole number of groups of 40")),
    "activation-scales": (put("model.layers.0.mlp.act.scales", lambda s: torch.ones(192, dtype=torch.float16)),
                          None, ("model.layers.0.mlp.act.scales", "ScaledActivation")),
    "gemv": (None, conf(version="gemv"), "version"),
    "bits-8": (None, conf(bits=8), "bits"),
    "no-zero-point": (None, conf(zero_point=False), "zero_point"),
    "group-size-zero": (None, conf(group_size=0), "group_size"),
    "group-size-string": (None, conf(group_size="32"), "group_size"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_checkpoints_end_in_one_clean_error(case, awq_bases, tmp_path, cli_runner):
    tensors, config, named = HOSTILE[case]
    path = edited(awq_bases[0], tmp_path, tensors, config)
    with pytest.raises(adaptools.InputError):
        Checkpoint.open(path)
    for command in (["dequantize", path, tmp_path / "out"], ["merge", path, awq_bases[1], tmp_path / "out"],
                    ["merge", path, awq_bases[1], tmp_path / "out", "--requantize"]):
        result = cli_runner(*command)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert str(path) in result.stderr, result.stderr
        assert all(n in result.stderr for n in ((named,) if isinstance(named, str) else named)), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()


def test_a_truncated_file_is_refused(awq_bases, tmp_path, cli_runner):
    truncated_is_refused(cli_runner, awq_bases[0], tmp_path)


def test_a_linear_left_dense_by_modules_to_not_convert_merges_as_dense(tmp_path, cli_runner):
    """llama-awq-g64 keeps layer 1's o_proj dense: it is copied by dequantize and merged as a plain weight."""
    paths = build_awq.build(tmp_path / "b")
    result = cli_runner("dequantize", paths["llama-awq-g64"], tmp_path / "out")
    assert result.exit_code == 0, result.output
    o_proj = "model.layers.1.self_attn.o_proj.weight"
    ours = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(ours[o_proj], load_file(str(paths["llama-awq-g64"] / "model.safetensors"))[o_proj])
