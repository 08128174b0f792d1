"""Checkpoint-level algebra: compare two checkpoints, explain a fine-tune with an adapter, extract an adapter
(from two checkpoints, or two pipeline folders component by component).

All three stream: one tensor of each checkpoint in memory at a time, read with plain reads.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .. import registry
from ..checkpoint import Checkpoint
from ..engine.components import is_pipeline, same_components
from ..errors import IncompatibleBaseError, InputError
from ..finite import count_nonfinite
from ..interfaces import LowRank, LowRankAlgebra, capability
from ..schema import Adapter, BaseRef, MemoryStore
from .algebra import check_energy, check_rank

#: Parameters that become modules_to_save instead of low-rank factors when they change.
FULL_TENSOR_NAMES = ("embed_tokens", "lm_head", "wte", "wpe", "word_embeddings", "embed_in", "embed_out")


@dataclass
class TensorDiff:
    tensor: str
    max_abs: float
    relative: float  # ‖a − b‖ / ‖a‖
    differing: int = 0  # elements whose values are not equal
    elements: int = 0


def _comparable(t: torch.Tensor) -> torch.Tensor:
    """8-bit floats decode only by a cast (torch compares and subtracts no float8); everything else as is."""
    return t.float() if t.is_floating_point() and t.element_size() == 1 else t


def _pairs(a: Checkpoint, b: Checkpoint) -> tuple[list[str], list[str], list[str]]:
    shared = [n for n in a.location if n in b.location]
    return shared, sorted(set(a.location) - set(b.location)), sorted(set(b.location) - set(a.location))


def diff_checkpoints(path_a: str | os.PathLike[str], path_b: str | os.PathLike[str]) -> dict[str, Any]:
    """Per-tensor max-abs and relative difference of two checkpoints, streaming, sorted largest first."""
    a, b = Checkpoint.open(path_a), Checkpoint.open(path_b)
    shared, only_a, only_b = _pairs(a, b)
    rows = []
    for name in shared:
        x, y = _comparable(a.read(name)), _comparable(b.read(name))
        if x.shape != y.shape:
            rows.append(TensorDiff(name, math.inf, math.inf, max(x.numel(), y.numel()), x.numel()))
            continue
        if not x.is_floating_point():
            same = 0.0 if torch.equal(x, y) else math.inf
            rows.append(TensorDiff(name, same, same, int((x != y).sum()), x.numel()))
            continue
        d = x.double() - y.double()
        norm = float(x.double().norm())
        differing = int(((x != y) & ~(x.isnan() & y.isnan())).sum())
        rows.append(TensorDiff(name, float(d.abs().max()) if d.numel() else 0.0,
                               float(d.norm()) / norm if norm > 0 else (0.0 if not d.any() else math.inf),
                               differing, x.numel()))
    rows.sort(key=lambda r: -r.relative)
    return {"tensors": [r.__dict__ for r in rows], "only_in_a": only_a, "only_in_b": only_b}


def explain(adapter: Adapter, base_path: str | os.PathLike[str], tuned_path: str | os.PathLike[str]) -> dict[str, Any]:
    """How much of (tuned − base) the adapter's delta explains, per module: 1 − ‖D − ΔW‖² / ‖D‖²."""
    base, tuned = Checkpoint.open(base_path), Checkpoint.open(tuned_path)
    factors = capability(registry.get_method(adapter.method), "algebra", LowRankAlgebra).low_rank(adapter)
    info = base.base_info()
    rows = []
    total_d = total_r = 0.0
    for module, f in factors.items():
        target = info.locate(module, "weight")
        if target is None or target not in tuned.location:
            raise IncompatibleBaseError(f"no {module}.weight in both checkpoints", path=adapter.source)
        d = tuned.read(target).double() - base.read(target).double()
        delta = f.b @ f.a
        if f.kind == "embedding" or delta.shape != d.shape:
            delta = delta.T
        if delta.shape != d.shape:
            raise IncompatibleBaseError(f"{module}: delta {list(delta.shape)} vs weights {list(d.shape)}")
        dn, rn = float(d.norm() ** 2), float((d - delta).norm() ** 2)
        total_d, total_r = total_d + dn, total_r + rn
        rows.append({"module": module, "explained": 1 - rn / dn if dn > 0 else (1.0 if rn == 0 else -math.inf),
                     "change_norm": math.sqrt(dn), "residual_norm": math.sqrt(rn)})
    rows.sort(key=lambda r: float(r["explained"]))  # type: ignore[arg-type]
    return {"modules": rows, "explained": 1 - total_r / total_d if total_d > 0 else 1.0}


@dataclass
class Extraction:
    adapter: Adapter
    retained: dict[str, float] = field(default_factory=dict)
    full_tensors: list[str] = field(default_factory=list)


def _low_rank_of(d: torch.Tensor, rank: int | None, energy: float | None, max_rank: int,
                 generator_seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Randomized SVD (seeded) of one difference: (b = U S, a = Vᵀ, share of ‖d‖² kept)."""
    total = float(d.norm() ** 2)
    limit = min(d.shape)
    q = min(limit, (rank or max_rank) + 8)
    torch.manual_seed(generator_seed)
    if q >= limit:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        v = vh.T
    else:
        u, s, v = torch.svd_lowrank(d, q=q, niter=4)
    if rank is None:
        cumulative = torch.cumsum(s * s, 0) / max(total, 1e-300)
        reached = (cumulative >= (energy or 1.0) - 1e-12).nonzero()
        rank = int(reached[0]) + 1 if reached.numel() else min(max_rank, s.numel())
    rank = max(1, min(rank, s.numel()))
    kept = float((s[:rank] ** 2).sum()) / total if total > 0 else 1.0
    return u[:, :rank] * s[:rank], v[:, :rank].T.contiguous(), kept


def extract(base_path: str | os.PathLike[str], tuned_path: str | os.PathLike[str], *, method: str,
            rank: int | None = None, energy: float | None = None, max_rank: int = 256, seed: int = 0,
            progress: Callable[[str], None] | None = None) -> Extraction:
    """An adapter of ``method`` (one with low-rank algebra; scale 1) approximating tuned − base, one weight
    at a time.

    2-D weights of linear layers become rank-``rank`` factors (or the smallest rank keeping ``energy`` of
    the change, up to ``max_rank``); conv kernels are flattened to [out, in·k…] for the SVD and become conv
    factors (a kernel-sized down, a 1x1 up; docs/diffusion.md "Extract"); changed embeddings, heads, norms
    and biases become full tensors (PEFT's modules_to_save). Two pipeline folders are compared component by
    component, each module path starting with its component, as merge splits them (docs/merge-engine.md).
    """
    chosen = capability(registry.get_method(method), "algebra", LowRankAlgebra)
    if (rank is None) == (energy is None):
        raise InputError("give exactly one of --rank and --energy")
    check_rank(rank)
    check_energy(energy)
    check_rank(max_rank, "--max-rank")
    run = _Run(rank, energy, max_rank, seed, progress, tuned_path)
    pipelines = is_pipeline(base_path), is_pipeline(tuned_path)
    if any(pipelines):
        if not all(pipelines):
            raise IncompatibleBaseError("one input is a pipeline folder (model_index.json) and the other is not",
                                        path=tuned_path if pipelines[0] else base_path,
                                        hint="extract compares two checkpoints or two pipelines")
        base_dir, tuned_dir = Path(base_path), Path(tuned_path)
        transposed = False
        config: dict[str, Any] = {}
        for component in same_components(base_dir, tuned_dir):
            transposed |= run.add(Checkpoint.open(base_dir / component), Checkpoint.open(tuned_dir / component),
                                  f"{component}.")
    else:
        transposed = run.add(Checkpoint.open(base_path), Checkpoint.open(tuned_path), "")
        config = {"task_type": "CAUSAL_LM"}
    saved = sorted({n.rpartition(".")[0] for n in run.full})
    # The PEFT config keys every PEFT method shares: orientation of the base's layers, whole modules saved.
    config.update({"fan_in_fan_out": transposed, "modules_to_save": saved or None, "inference_mode": True})
    template = Adapter(method, config, MemoryStore({}), base=BaseRef(name=str(base_path)),
                       provenance={"operation": "extract", "base": str(base_path), "tuned": str(tuned_path)})
    # errors about the extracted adapter (a writer refusing a full tensor) name what it was extracted from
    run.result.adapter = replace(chosen.from_low_rank(template, run.factors, run.full),
                                 source=f"the adapter extracted from {tuned_path}")
    return run.result


@dataclass
class _Run:
    """One extraction's settings and what it has found so far, across the checkpoints it compares."""

    rank: int | None
    energy: float | None
    max_rank: int
    seed: int
    progress: Callable[[str], None] | None
    tuned_path: str | os.PathLike[str]
    factors: dict[str, LowRank] = field(default_factory=dict)
    full: dict[str, torch.Tensor] = field(default_factory=dict)
    result: Extraction = field(default_factory=lambda: Extraction(adapter=None))  # type: ignore[arg-type]
    count: int = 0

    def add(self, base: Checkpoint, tuned: Checkpoint, prefix: str) -> bool:
        """Factor every changed weight of ``tuned`` against ``base`` (module paths get ``prefix``), one tensor
        pair in memory at a time; returns whether the layers store [in, out] (GPT-2's Conv1D)."""
        transposed = base.config.get("model_type") == "gpt2"  # Conv1D stores [in, out]
        shared, only_base, only_tuned = _pairs(base, tuned)
        if only_base or only_tuned:
            raise IncompatibleBaseError(
                f"the checkpoints hold different tensors ({[prefix + n for n in (only_base + only_tuned)[:3]]} ...)",
                path=self.tuned_path, hint="extract needs two checkpoints of one architecture")
        for name in shared:
            x, y = _comparable(base.read(name)), _comparable(tuned.read(name))
            self.count += 1
            if x.shape != y.shape:
                raise IncompatibleBaseError(f"{list(x.shape)} vs {list(y.shape)}", path=self.tuned_path,
                                            tensor=prefix + name,
                                            hint="resized vocabularies are not supported by extract yet")
            if not x.is_floating_point() or torch.equal(x, y):
                continue
            module, _, param = name.rpartition(".")
            module = prefix + module
            if x.dim() >= 2 and param == "weight" and not any(p in FULL_TENSOR_NAMES for p in module.split(".")):
                _refuse_non_finite(tuned, name, y)
                _refuse_non_finite(base, name, x)  # the difference would be non-finite
                d = y.double() - x.double()
                if transposed and d.dim() == 2:
                    d = d.T
                kernel = tuple(int(k) for k in d.shape[2:])
                b, a, kept = _low_rank_of(d.flatten(1), self.rank, self.energy, self.max_rank,
                                          self.seed + self.count - 1)
                self.factors[module] = LowRank(b, a, "conv", kernel) if kernel else LowRank(b, a, "linear")
                self.result.retained[module] = kept
            else:
                _refuse_non_finite(tuned, name, y)  # copied into the adapter whole; the base's value is not used
                self.full[f"{module}.replace_{param}"] = y.clone()
                self.result.full_tensors.append(prefix + name)
            if self.progress is not None:
                self.progress(prefix + name)
        return transposed


def _refuse_non_finite(checkpoint: Checkpoint, name: str, value: torch.Tensor) -> None:
    """Refuse a weight holding NaN or infinity, naming the file it is stored in: the SVD cannot factor it,
    and an adapter never carries a non-finite value (docs/outputs.md, "Never garbage")."""
    count = count_nonfinite(value)
    if count:
        raise checkpoint.located(InputError(
            f"holds {count} non-finite value(s) (NaN or infinity); extract needs finite weights in both checkpoints",
            tensor=name, hint="repair or re-export this checkpoint; adaptools will not factor or copy such values"))
