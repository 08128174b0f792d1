"""What the FP8 test files share: byte comparisons, and transformers' FP8 dequantization as the reference."""

from __future__ import annotations

import sys
import warnings

import torch
from conftest import FIXTURES
from safetensors.torch import load_file

sys.path.insert(0, str(FIXTURES))
import build_fp8  # noqa: E402, F401  (the fixture builder, for the test files)

FP8 = torch.float8_e4m3fn


def state_of(folder):
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def as_bytes(t):
    return t.view(torch.uint8) if t.dtype == FP8 else t


def same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(as_bytes(a), as_bytes(b))


def transformers_dequantized(path, dtype=None):
    """The model transformers loads from an FP8 checkpoint on the CPU (it dequantizes on load)."""
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = {"dtype": dtype} if dtype is not None else {}
        return AutoModelForCausalLM.from_pretrained(path, device_map="cpu", **kwargs)


def reference_dequantize(weight, scale_inv, block, dtype):
    """transformers' ``Fp8Dequantize._dequantize_one``; a weight with partial tiles is padded with zeros to
    whole tiles first (transformers refuses it as it is) and the result cut back."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    rows, cols = weight.shape
    padded = torch.zeros(scale_inv.shape[0] * block[0], scale_inv.shape[1] * block[1], dtype=torch.uint8)
    padded[:rows, :cols] = weight.view(torch.uint8)
    return Fp8Dequantize(None)._dequantize_one(padded.view(FP8), scale_inv, dtype)[:rows, :cols]
