"""What an AdapterHub bottleneck config means: the locations and roles, the flags with the library's
defaults, the declared schema, and which modules a config enables (docs/methods.md). One place, so that
the method (bottleneck.py) and the runtime (runtime.py) read a config the same way."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

LOCATIONS = ("mh_adapter", "output_adapter", "cross_adapter")
ROLES = ("down", "down_bias", "up", "up_bias", "norm_before", "norm_before_bias", "norm_after",
         "norm_after_bias", "gate", "gate_bias", "scaling")
#: Which flag in the config enables each role (None: always present).
ROLE_FLAG = {"norm_before": "ln_before", "norm_before_bias": "ln_before", "norm_after": "ln_after",
             "norm_after_bias": "ln_after", "gate": "use_gating", "gate_bias": "use_gating"}

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu, "relu6": F.relu6, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "swish": F.silu, "silu": F.silu,
    "tanh": torch.tanh, "sigmoid": torch.sigmoid, "leakyrelu": F.leaky_relu, "leaky_relu": F.leaky_relu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "mish": F.mish, "linear": lambda x: x,
    "identity": lambda x: x,
}
LINEAR = ("linear", "identity")

#: Per location: (sub-layer child names, the norm in front of it, whose input is the residual stream),
#: then the base parameters that end the sub-layer (the output projection a linear adapter folds into).
SUBLAYERS = {
    "mh_adapter": ((("self_attn", "input_layernorm"), ("attn", "ln_1")),
                   ("self_attn.o_proj", "attn.c_proj", "self_attn.out_proj")),
    "output_adapter": ((("mlp", "post_attention_layernorm"), ("mlp", "ln_2")),
                       ("mlp.down_proj", "mlp.c_proj", "mlp.fc2")),
}
#: Model types whose output projections are GPT-2 ``Conv1D`` (weight stored ``[in, out]``).
CONV1D_MODELS = ("gpt2",)
_FLAG = {"type": ["boolean", "null"]}
_FACTOR = {"type": "number", "exclusiveMinimum": 0, "maximum": 2**20, "description": "a positive number"}
#: The architecture flags adaptools reads (``config["config"]``), with their types and ranges.
FLAGS_SCHEMA = {"type": "object", "properties": {
    **{flag: _FLAG for flag in ("original_ln_before", "original_ln_after", "ln_before", "ln_after", "is_parallel",
                                "use_gating", "adapter_residual_before_ln", "mh_adapter", "output_adapter",
                                "cross_adapter", "phm_layer")},
    "residual_before_ln": {"type": ["boolean", "string", "null"], "maxLength": 40},
    "non_linearity": {"type": ["string", "null"], "maxLength": 40},
    "inv_adapter": {"type": ["string", "null"], "maxLength": 100},
    "leave_out": {"type": ["array", "null"], "items": {"type": "integer", "minimum": 0, "maximum": 2**31},
                  "description": "a list of layer indices"},
    "scaling": {"anyOf": [{"type": "number", "minimum": -1e6, "maximum": 1e6}, {"enum": ["learned", "channel"]}],
                "description": "a finite number, \"learned\" or \"channel\""},
    "reduction_factor": {"anyOf": [_FACTOR, {"type": "object", "additionalProperties": _FACTOR}],
                         "description": "a positive number, or an object of them per layer"},
}}
CONFIG_SCHEMA = {"type": "object", "properties": {
    "config": FLAGS_SCHEMA,
    "hidden_size": {"type": ["integer", "null"], "minimum": 1, "maximum": 2**31, "description": "a positive integer"},
}}
NAMES = {"seq_bn": "Pfeiffer (sequential, after the FFN)", "double_seq_bn": "Houlsby (after attention and FFN)",
         "par_bn": "parallel (He et al.)"}


def flags(config: Mapping[str, Any]) -> dict[str, Any]:
    """The architecture flags (``config["config"]``), with the library's defaults filled in."""
    inner = dict(config.get("config") or {})
    defaults = {"original_ln_before": False, "original_ln_after": True, "ln_before": False, "ln_after": False,
                "is_parallel": False, "scaling": 1.0, "use_gating": False, "residual_before_ln": True,
                "adapter_residual_before_ln": False, "leave_out": [], "phm_layer": False, "inv_adapter": None,
                "mh_adapter": False, "output_adapter": False, "cross_adapter": False}
    return {**defaults, **inner}


def architecture_name(f: Mapping[str, Any]) -> str:
    if f["is_parallel"]:
        return "par_bn"
    if f["mh_adapter"] and f["output_adapter"]:
        return "double_seq_bn"
    return "seq_bn" if f["output_adapter"] else "custom"


def reduction_for(f: Mapping[str, Any], layer: int) -> float | None:
    rf = f.get("reduction_factor")
    if isinstance(rf, Mapping):
        rf = rf.get(str(layer), rf.get("default"))
    try:
        return float(rf)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def layer_index(module: str) -> int | None:
    """The layer number in ``model.layers.3.output_adapter`` (the last integer path component)."""
    numbers = [p for p in module.split(".") if p.isdigit()]
    return int(numbers[-1]) if numbers else None


def enabled(f: Mapping[str, Any], module: str) -> bool:
    """Whether the config switches on the adapter at ``<layer>.<location>`` (its location flag, leave_out):
    the library builds no adapter elsewhere, so tensors there are ignored."""
    layer = layer_index(module)
    return bool(f.get(module.rpartition(".")[2])) and (layer is None or layer not in (f.get("leave_out") or []))
