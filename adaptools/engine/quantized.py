"""Quantized outputs: which dense weights get quantized, and how much of a change survives re-encoding.

Re-encoding is lossy and, with nested quantization, not even a fixed point, so the plan copies
untouched groups byte for byte and re-encodes only what a merge changed. For each of those the report
says how much of the change survived: ``‖deq(q(W + Δ)) − W‖ / ‖Δ‖`` with ``W`` the decoded base, and the
rounding error re-encoding added, ``‖deq(q(W + Δ)) − (W + Δ)‖ / ‖Δ‖``.
Small deltas (QLoRA's usually are) round away, which is why dequantize-merge is the default.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import Checkpoint
from ..errors import InputError
from ..interfaces import Backend
from ..kernels import load_kernel
from .options import QuantizeOptions

#: Parameters transformers never quantizes (output and input embeddings), matched by module name part.
NEVER_QUANTIZED = ("lm_head", "embed_tokens", "wte", "wpe", "word_embeddings", "embed_in", "embed_out",
                   "tok_embeddings", "embeddings", "position_embeddings")
#: Architectures whose linear layers are GPT-2 style Conv1D (weights stored transposed).
CONV1D_MODEL_TYPES = ("gpt2",)


@dataclass
class Survival:
    """How much of one parameter's merged change survived re-encoding."""

    tensor: str
    delta_norm: float
    retained: float  # ‖deq(q(W+Δ)) − W‖ / ‖Δ‖
    codes_changed: float  # share of stored bytes that changed
    #: ‖deq(q(W+Δ)) − (W+Δ)‖ / ‖Δ‖: the rounding error re-encoding added, against the change. ``retained`` alone
    #: can read near 1 while most of what was written is rounding noise (a 4-bit K-quant's re-encoding is not
    #: a fixed point), so both are reported.
    error: float = 0.0


#: A layer that kept less than this share of its change has "largely lost the fine-tune": the survival warning
#: names it. One place, so the CLI, ``--json`` consumers and the library read the same judgement.
LOST_BELOW = 0.5


@dataclass(frozen=True)
class SurvivalVerdict:
    """What a run's survival entries (``MergeSummary.survival``) add up to: the median, least and most kept,
    the median rounding error, and the layers that lost most of their change (least kept first)."""

    layers: int
    median_retained: float
    min_retained: float
    max_retained: float
    median_error: float
    lost: tuple[tuple[str, float], ...]  # (tensor, share kept), fewest kept first

    @classmethod
    def of(cls, survival: list[dict[str, Any]]) -> SurvivalVerdict | None:
        """None when nothing was requantized."""
        if not survival:
            return None
        kept = sorted(float(s["retained"]) for s in survival)
        errors = sorted(float(s.get("error", 0.0)) for s in survival)
        lost = sorted((float(s["retained"]), str(s["tensor"])) for s in survival if s["retained"] < LOST_BELOW)
        return cls(len(kept), kept[len(kept) // 2], kept[0], kept[-1], errors[len(errors) // 2],
                   tuple((name, share) for share, name in lost))


def quantize_targets(checkpoint: Checkpoint, backend: Backend,
                     options: QuantizeOptions) -> dict[str, Mapping[str, Any]]:
    """The dense 2-D linear weights transformers' quantization integration would quantize, each with the
    backend's settings. Embeddings, lm_head, norms, biases and ``skip_modules`` stay dense."""
    if checkpoint.groups:
        raise InputError("this checkpoint is already quantized", path=checkpoint.path,
                         hint="dequantize it first, or use merge --requantize")
    if checkpoint.config.get("model_type") in CONV1D_MODEL_TYPES:
        raise InputError("GPT-2 style Conv1D weights are stored transposed; quantizing them is not supported",
                         path=checkpoint.path)
    targets: dict[str, Mapping[str, Any]] = {}
    for name in checkpoint.location:
        tensor = checkpoint.tensor(name)
        module = name.rpartition(".")[0]
        parts = module.split(".")
        if (not name.endswith(".weight") or len(tensor.shape) != 2 or tensor.dtype not in ("F32", "F16", "BF16")
                or any(p in NEVER_QUANTIZED for p in parts)
                or any(module == s or module.endswith("." + s) or s in parts for s in options.skip_modules)):
            continue
        targets[name] = backend.quantize_settings(tensor, options)
    if not targets:
        raise InputError("no linear weights to quantize", path=checkpoint.path)
    return targets


#: The norms kernel's interface version (``adaptools_norms_abi`` in csrc/norms.c).
NORMS_ABI = 1
#: The kernel's codes for the dtypes it widens (adaptools/packed.py's KINDS).
_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _load_norms() -> Any:
    """The survival report's C sums (csrc/norms.c, built into the packed-kernel library), or None."""
    lib = load_kernel(Path(__file__).resolve().parent.parent, "_packed_kernels", "adaptools_norms", NORMS_ABI)
    if lib is None:
        return None
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.adaptools_norms_distances.argtypes = [ptr, c_int, ptr, c_int, ptr, c_int, i64, i64, ptr]
    lib.adaptools_norms_distances.restype = None
    lib.adaptools_norms_bytes_differ.argtypes = [ptr, ptr, i64, i64]
    lib.adaptools_norms_bytes_differ.restype = i64
    return lib


#: None without a built kernel or with ``ADAPTOOLS_PACKED_PURE_TORCH=1``: then torch computes the same report.
NORMS = None if os.environ.get("ADAPTOOLS_PACKED_PURE_TORCH") else _load_norms()


def survival_norms(merged: torch.Tensor, base: torch.Tensor, requantized: torch.Tensor) -> tuple[float, float, float]:
    """``‖merged − base‖, ‖requantized − base‖, ‖requantized − merged‖``: each difference in float32, squared
    and summed in float64. In one pass of the C kernel over the three tensors when it is loaded and they are
    contiguous float32/bfloat16/float16 of one size, else :func:`distances`; the two differ only in the order
    of the sums. One thread: the pass is memory-bound, and a second thread made it no faster (docs/merge-engine.md,
    "The survival report in C")."""
    tensors = (merged, base, requantized)
    n = merged.numel()
    if NORMS is None or any(t.dtype not in _KINDS or not t.is_contiguous() or t.numel() != n or t.device.type != "cpu"
                            for t in tensors):
        norm, kept, wrong = distances([(merged, base), (requantized, base), (requantized, merged)])
        return norm, kept, wrong
    sums = (ctypes.c_double * 3)()
    NORMS.adaptools_norms_distances(merged.data_ptr(), _KINDS[merged.dtype], base.data_ptr(), _KINDS[base.dtype],
                                    requantized.data_ptr(), _KINDS[requantized.dtype], 0, n, sums)
    return sums[0] ** 0.5, sums[1] ** 0.5, sums[2] ** 0.5


def changed_share(old: torch.Tensor, new: torch.Tensor) -> float:
    """The share of ``old``'s bytes that ``new`` changed (1 when their sizes differ)."""
    a, b = old.reshape(-1).view(torch.uint8), new.reshape(-1).view(torch.uint8)
    if a.numel() != b.numel():
        return 1.0
    n = a.numel()
    if NORMS is None or not (a.is_contiguous() and b.is_contiguous()) or a.device.type != "cpu" \
            or b.device.type != "cpu":
        return int(torch.count_nonzero(a != b)) / max(1, n)
    return int(NORMS.adaptools_norms_bytes_differ(a.data_ptr(), b.data_ptr(), 0, n)) / max(1, n)


def distances(pairs: list[tuple[torch.Tensor, torch.Tensor]], chunk: int = 1 << 18) -> list[float]:
    """‖a − b‖ for each pair of same-sized tensors (:func:`survival_norms` without its kernel), in fp32, a chunk
    of elements at a time and every pair in the same pass (no full-size temporaries, each tensor read once per
    chunk; sums in float64)."""
    flat = [(a.reshape(-1), b.reshape(-1)) for a, b in pairs]
    totals = [0.0] * len(flat)
    for start in range(0, flat[0][0].numel() if flat else 0, chunk):
        cast: dict[int, torch.Tensor] = {}  # a tensor that is in two pairs is cast once per chunk

        def piece(t: torch.Tensor) -> torch.Tensor:
            if id(t) not in cast:
                cast[id(t)] = t[start:start + chunk].float()
            return cast[id(t)]

        for i, (x, y) in enumerate(flat):
            d = piece(x) - piece(y)
            totals[i] += float(torch.dot(d, d))
    return [float(t ** 0.5) for t in totals]


def survival(name: str, before: torch.Tensor, merged: torch.Tensor, base: torch.Tensor,
             group: Mapping[str, torch.Tensor], requantized: torch.Tensor, main: str | None = None,
             norms: tuple[float, float, float] | None = None) -> Survival:
    """Share of the change kept: ‖deq(q(W+Δ)) − W‖ / ‖Δ‖, with W the decoded base and W+Δ as rounded to
    the stored dtype (what was encoded); ``before`` is the stored main tensor the group replaces (``main``,
    when it is not stored under the parameter's own name), ``group`` what the backend encoded and
    ``requantized`` that group decoded again. ``norms``: :func:`survival_norms` of the three, if the caller
    already took them (the engine does, to check what it wrote)."""
    norm, kept, wrong = norms if norms is not None else survival_norms(merged, base, requantized)
    retained = kept / norm if norm > 0 else 1.0
    error = wrong / norm if norm > 0 else 0.0
    return Survival(name, norm, retained, changed_share(before, group[main or name]), error)
