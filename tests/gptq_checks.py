"""What the GPTQ test files share: the fixture builder (tiny GPTQ checkpoints packed by the format's rules, its
plain decoder), byte comparisons, and the reference dense model PEFT merges into."""

from __future__ import annotations

import sys
import warnings

import torch
from conftest import FIXTURES
from safetensors.torch import load_file

sys.path.insert(0, str(FIXTURES))
import build_gptq  # noqa: E402  (the fixture builder, for the test files)
import gptq_oracle  # noqa: E402, F401  (GPTQModel's own code, for the slow tests)

VARIANTS = tuple(build_gptq.VARIANTS)


def state_of(folder):
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8) if a.dtype.is_floating_point
                                                                     else a, b.view(torch.uint8)
                                                                     if b.dtype.is_floating_point else b)


def modules_of(stored):
    return sorted(k.removesuffix(".qweight") for k in stored if k.endswith(".qweight"))


def rule_state(path):
    """The checkpoint's tensors with each GPTQ linear replaced by the fixture builder's plain decode of it."""
    bits, _, _, _, fmt = build_gptq.VARIANTS[path.name]
    stored = load_file(str(path / "model.safetensors"))
    modules = modules_of(stored)
    state = {k: v for k, v in stored.items() if k.rpartition(".")[2] not in ("qweight", "qzeros", "scales", "g_idx")}
    state.update({f"{m}.weight": build_gptq.decode(stored, m, bits, fmt == "gptq") for m in modules})
    return state


def dense_loaded(path, state=None):
    """The fp16 model transformers loads from a dense folder, with ``state`` loaded into it when given."""
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16)
    if state is not None:
        model.load_state_dict(state)
    return model.eval()
