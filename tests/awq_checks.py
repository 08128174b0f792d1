"""What the AWQ test files share: the fixture builder, byte comparisons, and the dequantized model as a plain
transformers model (the reference PEFT merges into)."""

from __future__ import annotations

import sys
import warnings

import torch
from conftest import FIXTURES
from safetensors.torch import load_file

sys.path.insert(0, str(FIXTURES))
import awq_oracle  # noqa: E402, F401  (AutoAWQ in its own venv, for the slow tests)
import build_awq  # noqa: E402, F401  (the fixture builder)

PARTS = ("qweight", "qzeros", "scales")


def state_of(folder):
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.view(torch.int16) if a.dtype == torch.float16 else a, b.view(torch.int16) if b.dtype == torch.float16 else b)


def awq_modules(state):
    return sorted(k.removesuffix(".qweight") for k in state if k.endswith(".qweight"))


def load_dense(path):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.float16)
