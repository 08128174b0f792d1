"""What the compressed-tensors test files share: byte comparisons, and the compressed-tensors library's own
decompression and compression as the references."""

from __future__ import annotations

import json
import sys

import torch
from conftest import FIXTURES
from safetensors.torch import load_file

sys.path.insert(0, str(FIXTURES))
import build_compressed_tensors as build_ct  # noqa: E402, F401  (the fixture builder, for the test files)

KINDS = ("pack", "fp8", "int8", "nvfp4")


def state_of(folder):
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def as_bytes(t):
    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.bfloat16) else t


def same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(as_bytes(a), as_bytes(b))


def library_config(path):
    from compressed_tensors.quantization import QuantizationConfig

    return QuantizationConfig.model_validate(json.loads((path / "config.json").read_text())["quantization_config"])


def library_scheme(config, module):
    """The config group compressed-tensors applies to ``module`` (its own name matcher)."""
    from compressed_tensors.utils.match import match_name

    return next(s for s in config.config_groups.values()
                if any(t == "Linear" or match_name(module, t) for t in s.targets))


def library_decompress(path, state, module):
    """The library's per-module ``decompress`` of ``module``'s stored tensors in ``state``."""
    from compressed_tensors.compressors import BaseCompressor

    scheme = library_scheme(library_config(path), module)
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    stored = {p: state[f"{module}.{p}"] for p in compressor.compression_param_names(scheme)}
    return compressor.decompress(stored, scheme)["weight"]


def library_compress(path, dense, module):
    """The library's compression of a dense weight as llm-compressor makes it: ``calculate_qparams`` from its
    minima and maxima (the fixture builder's min-max reduction), then the compressor's ``compress``."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    scheme = library_scheme(library_config(path), module)
    low, high = build_ct._minmax(dense, scheme.weights)
    state = {"weight": dense}
    if scheme.weights.strategy == "tensor_group":  # NVFP4: the global scale first, as the fixture builder does
        state["weight_global_scale"] = generate_gparam(dense.amin(), dense.amax())
    scale, zero = calculate_qparams(low, high, scheme.weights, global_scale=state.get("weight_global_scale"))
    shape = (1,) if scheme.weights.strategy == "tensor" else tuple(low.shape)
    state.update({"weight_scale": scale.reshape(shape), "weight_zero_point": zero.reshape(shape)})
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    return {f"{module}.{k}": v for k, v in compressor.compress(state, scheme).items()}
