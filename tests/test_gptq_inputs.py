"""Hostile and unsupported GPTQ checkpoints: each ends in one clear line naming the file and what is wrong, exit
code 2, no traceback and nothing written, whether the command is ``dequantize``, ``merge`` or
``merge --requantize``."""

from __future__ import annotations

import json

import pytest
import torch
from gptq_checks import build_gptq
from hostile_edits import edited, put, refused_in_one_line, setitem, truncated_is_refused

M = "model.layers.0.mlp.gate_proj"  # 4-bit groups of 32 (gptq, sym): qweight [16, 256], qzeros [4, 32], scales [4, 256]


@pytest.fixture(scope="module")
def gptq_bases(tmp_path_factory):
    from peft import LoraConfig
    from peft_oracle import seeded_lora

    root = tmp_path_factory.mktemp("gptq-inputs")
    paths = build_gptq.build(root, ("llama-gptq-4",))
    seeded_lora(paths["llama-gptq-dense"], LoraConfig(r=2, target_modules=["gate_proj", "q_proj"]), root / "lora", 3,
                0.05)
    return paths["llama-gptq-4"], root / "lora"








W, Z, S, G = (f"{M}.{p}" for p in ("qweight", "qzeros", "scales", "g_idx"))
#: case -> (tensor edit, config edit, what the one line must name)
HOSTILE = {
    "qweight-truncated": (put(W, lambda s: s[W][:12].clone()), None, "qweight's 12 rows"),
    "qweight-narrow": (put(W, lambda s: s[W][:, :200].clone()), None, M),
    "qweight-int8": (put(W, lambda s: s[W].view(torch.int8)), None, W),
    "qweight-3d": (put(W, lambda s: s[W].reshape(2, 8, 256).clone()), None, W),
    "qweight-missing": (lambda s: s.pop(W), None, W),
    "qzeros-shape": (put(Z, lambda s: s[Z][:, :16].clone()), None, Z),
    "qzeros-missing": (lambda s: s.pop(Z), None, Z),
    "scales-nan": (setitem(S, (1, 1), float("nan")), None, S),
    "scales-zero": (setitem(S, (0, 0), 0.0), None, S),
    "scales-negative": (setitem(S, (2, 0), -0.001), None, S),
    "scales-inf": (setitem(S, (0, 1), float("inf")), None, S),
    "scales-int": (put(S, lambda s: s[S].to(torch.int32)), None, S),
    "scales-groups": (put(S, lambda s: s[S][:3].clone()), None, S),
    "g-idx-out-of-range": (setitem(G, 5, 4), None, G),
    "g-idx-negative": (setitem(G, 0, -1), None, G),
    "g-idx-length": (put(G, lambda s: s[G][:120].clone()), None, G),
    "g-idx-int64": (put(G, lambda s: s[G].to(torch.int64)), None, G),
    "g-idx-missing": (lambda s: s.pop(G), None, G),
    "dense-and-packed": (put(f"{M}.weight", lambda s: torch.zeros(256, 128, dtype=torch.float16)), None,
                         f"{M}.weight"),
    "bits-five": (None, lambda q: q.update(bits=5), "bits"),
    "bits-string": (None, lambda q: q.update(bits="4"), "bits"),
    "bits-lie": (None, lambda q: q.update(bits=8), "bits=8"),
    "group-size-not-dividing": (None, lambda q: q.update(group_size=48), "groups of 48"),
    "group-size-lie": (None, lambda q: q.update(group_size=64), "model.layers.0.mlp.down_proj.qzeros"),
    "group-size-zero": (None, lambda q: q.update(group_size=0), "group_size"),
    "format-marlin": (None, lambda q: q.update(checkpoint_format="marlin"), "checkpoint_format"),
    "dynamic": (None, lambda q: q.update(dynamic={"-:.*down_proj": {}}), "dynamic"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_checkpoints_end_in_one_clean_error(case, gptq_bases, tmp_path, cli_runner):
    tensors, config, named = HOSTILE[case]
    path = edited(gptq_bases[0], tmp_path, tensors, config)
    commands = (["dequantize", path, tmp_path / "out"], ["merge", path, gptq_bases[1], tmp_path / "out"],
                ["merge", path, gptq_bases[1], tmp_path / "out", "--requantize"])
    refused_in_one_line(cli_runner, path, named, commands, tmp_path / "out")


def test_a_truncated_file_is_refused(gptq_bases, tmp_path, cli_runner):
    truncated_is_refused(cli_runner, gptq_bases[0], tmp_path)


def test_conv1d_architectures_are_refused(gptq_bases, tmp_path, cli_runner):
    """GPT-2's Conv1D weights are ``[in, out]``; GPTQ packs them transposed: refused rather than written in the
    wrong layout."""
    path = edited(gptq_bases[0], tmp_path)
    data = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**data, "model_type": "gpt2"}))
    result = cli_runner("dequantize", path, tmp_path / "out")
    assert result.exit_code == 2 and "Conv1D" in result.stderr and "qweight" in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
