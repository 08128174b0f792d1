"""Writing 4-bit output: ``merge --requantize`` and ``adaptools requantize``.

Quantized outputs differ from dense ones in two ways, both handled here. A parameter becomes a group of
tensors whose sizes are known only after encoding (the JSON state's length), so shards are written with
:class:`DeferredSafetensorsWriter`. And re-encoding is lossy and, with double quantization, not even a
fixed point (nf4-format.md §4), so untouched groups are copied byte for byte, never re-encoded.

For every parameter a merge changes, the report says how much of the change survived requantization:
``‖deq(q(W + Δ)) − W‖ / ‖Δ‖`` with ``W`` the dequantized base. NF4 rounds small deltas away; QLoRA
deltas are usually small, which is why dequantize-merge (dense output) is the default.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import Checkpoint
from ..errors import InputError
from ..interfaces import Backend, TensorUpdate
from ..safetensors_io import DeferredSafetensorsWriter, TensorSpec

#: Parameters transformers never quantizes (output embedding, input embeddings), matched by name.
NEVER_QUANTIZED = ("lm_head", "embed_tokens", "wte", "wpe", "word_embeddings", "embed_in", "embed_out",
                   "tok_embeddings", "embeddings", "position_embeddings")


@dataclass
class QuantizeOptions:
    """Settings for turning dense weights into 4-bit ones (``adaptools requantize``)."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    skip_modules: tuple[str, ...] = ()


@dataclass
class Survival:
    """How much of one parameter's merged change survived requantization."""

    tensor: str
    delta_norm: float
    retained: float  # ‖deq(q(W+Δ)) − W‖ / ‖Δ‖
    codes_changed: float  # share of packed bytes that changed


@dataclass
class QuantizedPlan:
    """Which parameters are written as groups, with which backend and settings."""

    targets: dict[str, tuple[Backend, dict[str, Any]]] = field(default_factory=dict)
    keep_untouched: bool = True  # copy untouched groups byte for byte
    survival: list[Survival] = field(default_factory=list)


def plan_requantize(checkpoint: Checkpoint) -> QuantizedPlan:
    """Keep every 4-bit parameter 4-bit, with its own settings (``merge --requantize``)."""
    if not checkpoint.groups:
        raise InputError("--requantize needs a 4-bit base", path=checkpoint.path,
                         hint="to quantize a dense model, use `adaptools requantize`")
    plan = QuantizedPlan()
    for param, (backend, _) in checkpoint.groups.items():
        plan.targets[param] = (backend, backend.group_settings(param, checkpoint.read_small))
    return plan


def plan_quantize(checkpoint: Checkpoint, backend: Backend, options: QuantizeOptions) -> QuantizedPlan:
    """Quantize the dense 2-D linear weights, as transformers' bitsandbytes integration does."""
    if checkpoint.groups:
        raise InputError("this checkpoint is already quantized", path=checkpoint.path,
                         hint="dequantize it first, or use merge --requantize")
    if checkpoint.config.get("model_type") in ("gpt2",):
        raise InputError("GPT-2 style Conv1D weights are stored transposed; quantizing them is not supported",
                         path=checkpoint.path)
    plan = QuantizedPlan(keep_untouched=False)
    for name in checkpoint.location:
        tensor = checkpoint.tensor(name)
        module = name.rpartition(".")[0]
        parts = module.split(".")
        if (not name.endswith(".weight") or len(tensor.shape) != 2 or tensor.dtype not in ("F32", "F16", "BF16")
                or any(p in NEVER_QUANTIZED for p in parts)
                or any(module == s or module.endswith("." + s) or s in parts for s in options.skip_modules)):
            continue
        dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[tensor.dtype]
        plan.targets[name] = (backend, {"blocksize": options.blocksize, "double_quant": options.double_quant,
                                        "dtype": dtype, "storage": torch.uint8})
    if not plan.targets:
        raise InputError("no linear weights to quantize", path=checkpoint.path)
    return plan


def quantization_config(options: QuantizeOptions, compute_dtype: str, skip: tuple[str, ...]) -> dict[str, Any]:
    """The ``quantization_config`` block transformers writes for a bitsandbytes 4-bit model."""
    return {"_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": compute_dtype,
            "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": options.quant_type,
            "bnb_4bit_use_double_quant": options.double_quant, "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": list(skip) or None,
            "llm_int8_threshold": 6.0, "load_in_4bit": True, "load_in_8bit": False, "quant_method": "bitsandbytes"}


def write_quantized_shard(path: Path, names: list[str], checkpoint: Checkpoint, plan: QuantizedPlan,
                          updates: Mapping[str, list[TensorUpdate]], dense_value: Callable[..., Any],
                          write_dense: Callable[[DeferredSafetensorsWriter, str], int], metadata: dict[str, str],
                          on_tensor: Callable[[str, int, bool], None]) -> None:
    """Write one shard: changed or newly quantized parameters are encoded as groups; untouched groups and
    companions are copied byte for byte; everything else goes through ``write_dense``."""
    parents = {c: p for p, (_, names_) in checkpoint.groups.items() for c in names_}
    handles: dict[Path, Any] = {}

    def raw_copy(writer: DeferredSafetensorsWriter, name: str) -> int:
        shard, info = checkpoint.location[name]
        fh = handles.get(shard.path) or handles.setdefault(shard.path, open(shard.path, "rb"))
        writer.copy_range(name, fh, info.begin, info.nbytes, TensorSpec(info.dtype, info.shape))
        return info.nbytes

    try:
        with DeferredSafetensorsWriter(path, metadata) as writer:
            for name in names:
                if name in parents:
                    if parents[name] in updates or not plan.keep_untouched:
                        continue  # written with its parameter
                    on_tensor(name, raw_copy(writer, name), False)
                elif name in plan.targets and not (plan.keep_untouched and name not in updates):
                    backend, settings = plan.targets[name]
                    report = name in updates and name in checkpoint.groups
                    merged, original = dense_value(name, True) if report else (dense_value(name), None)
                    group = backend.encode_group(name, merged, settings)
                    for key, value in group.items():
                        writer.write(key, value)
                    if report:
                        plan.survival.append(_survival(name, checkpoint, backend, merged, original, group))
                    del merged, original
                    on_tensor(name, sum(v.numel() * v.element_size() for v in group.values()), name in updates)
                elif name in plan.targets:
                    on_tensor(name, raw_copy(writer, name), False)
                else:
                    on_tensor(name, write_dense(writer, name), name in updates)
    finally:
        for fh in handles.values():
            fh.close()


def distance(a: torch.Tensor, b: torch.Tensor, chunk: int = 1 << 18) -> float:
    """‖a − b‖ in fp32, a chunk of elements at a time (no full-size temporaries; sums in float64)."""
    x, y = a.reshape(-1), b.reshape(-1)
    total = 0.0
    for start in range(0, x.numel(), chunk):
        d = x[start:start + chunk].float() - y[start:start + chunk].float()
        total += float(torch.dot(d, d))
    return total ** 0.5


def _survival(name: str, checkpoint: Checkpoint, backend: Backend, merged: torch.Tensor, base: torch.Tensor,
              group: dict[str, torch.Tensor]) -> Survival:
    """Share of the change kept: ‖deq(q(W+Δ)) − W‖ / ‖Δ‖, with W the dequantized base (already decoded)
    and W+Δ as rounded to the stored dtype, which is what was encoded."""
    norm = distance(merged, base)
    requantized = backend.decode_group(name, lambda key: group[key], [k for k in group if k != name])
    kept = distance(requantized, base)
    retained = kept / norm if norm > 0 else 1.0
    before = checkpoint.read_small(name).reshape(-1).view(torch.uint8)
    after = group[name].reshape(-1).view(torch.uint8)
    changed = int(torch.count_nonzero(before != after)) / max(1, before.numel())
    return Survival(name, norm, retained, changed)
