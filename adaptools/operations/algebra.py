"""Adapter algebra on low-rank factors: diff, combine, resize.

Every method that can express its delta per module as ``b @ a`` (``AdapterMethod.low_rank``) gets these
operations without forming a dense delta: norms and inner products come from r×r products
(``<B1 A1, B2 A2> = tr((B1ᵀ B2)(A2 A1ᵀ))``), and truncations from the SVD of an r×r core after two thin
QR decompositions. Arithmetic is float64; results are written as plain LoRA with scale 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import registry
from ..errors import IncompatibleBaseError, InputError, UnsupportedOperationError
from ..interfaces import LowRank, LowRankAlgebra, capability
from ..schema import Adapter


def check_rank(rank: object, what: str = "--rank") -> None:
    """A target rank must be a positive integer (``True`` is an int in Python, and is refused)."""
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= 2**20):
        raise InputError(f"{what} must be a positive integer, got {rank!r}")


def check_energy(energy: object) -> None:
    """An energy share must be a number in (0, 1] (NaN is not)."""
    if energy is not None and (not isinstance(energy, (int, float)) or isinstance(energy, bool)
                               or not 0 < energy <= 1):
        raise InputError(f"--energy must be in (0, 1], got {energy!r}")


def _inner(x: LowRank, y: LowRank) -> float:
    return float(torch.trace((x.b.T @ y.b) @ (y.a @ x.a.T)))


def _norm2(x: LowRank) -> float:
    return max(_inner(x, x), 0.0)


@dataclass
class ModuleDiff:
    module: str
    norm_a: float
    norm_b: float
    difference: float  # ‖ΔA − ΔB‖_F
    relative: float  # difference / ‖ΔA‖ (inf when ΔA is zero and ΔB is not)
    cosine: float | None


@dataclass
class AdapterDiff:
    modules: list[ModuleDiff] = field(default_factory=list)
    config: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    shapes: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)  # tensors whose shape differs

    def to_json(self) -> dict[str, Any]:
        return {"modules": [m.__dict__ for m in self.modules],
                "config": {k: {"a": a, "b": b} for k, (a, b) in self.config.items()},
                "only_in_a": self.only_in_a, "only_in_b": self.only_in_b,
                "shapes": {k: {"a": a, "b": b} for k, (a, b) in self.shapes.items()}}


def _factors(adapter: Adapter) -> dict[str, LowRank]:
    return capability(registry.get_method(adapter.method), "algebra", LowRankAlgebra).low_rank(adapter)


def _config_changes(a: Adapter, b: Adapter) -> dict[str, tuple[Any, Any]]:
    """Changed config fields; nested objects (AdapterHub's ``config``) are compared field by field."""
    changes: dict[str, tuple[Any, Any]] = {}

    def walk(x: dict[str, Any], y: dict[str, Any], prefix: str) -> None:
        for key in sorted(set(x) | set(y)):
            if prefix == "" and key in ("modules", "peft_version"):
                continue
            va, vb = x.get(key), y.get(key)
            if isinstance(va, dict) and isinstance(vb, dict) and prefix == "":
                walk(va, vb, f"{key}.")
            elif va != vb:
                changes[prefix + key] = (va, vb)

    walk(a.config, b.config, "")
    return changes


def tensor_diff(a: Adapter, b: Adapter) -> AdapterDiff:
    """Per-tensor ‖A − B‖_F, relative difference and cosine, for methods whose tensors are not a low-rank
    delta (bottleneck, prefix): the rows name tensors instead of modules."""
    result = AdapterDiff(config=_config_changes(a, b))
    names_a, names_b = set(a.tensor_names()), set(b.tensor_names())
    result.only_in_a, result.only_in_b = sorted(names_a - names_b), sorted(names_b - names_a)
    for name in sorted(names_a & names_b):
        x, y = a.tensor(name).double(), b.tensor(name).double()
        if x.shape != y.shape:
            result.shapes[name] = (list(x.shape), list(y.shape))
            continue
        na, nb = float(x.norm()), float(y.norm())
        d = 0.0 if torch.equal(x, y) else float((x - y).norm())
        cos = float((x * y).sum()) / (na * nb) if na > 0 and nb > 0 else None
        rel = d / na if na > 0 else (0.0 if d == 0 else math.inf)
        result.modules.append(ModuleDiff(name, na, nb, d, rel, cos))
    result.modules.sort(key=lambda m: -m.difference)
    return result


def diff(a: Adapter, b: Adapter) -> AdapterDiff:
    """Per-module ‖ΔA − ΔB‖_F, relative difference and cosine, exactly from the factors, plus config changes.

    Methods without a low-rank delta are compared tensor by tensor (:func:`tensor_diff`).
    """
    method = registry.get_method(a.method)
    if a.method == b.method and "algebra" not in method.operations:
        return tensor_diff(a, b)
    fa, fb = _factors(a), _factors(b)
    result = AdapterDiff(config=_config_changes(a, b))
    result.only_in_a = sorted(set(fa) - set(fb))
    result.only_in_b = sorted(set(fb) - set(fa))
    for module in sorted(set(fa) | set(fb)):
        x, y = fa.get(module), fb.get(module)
        na = math.sqrt(_norm2(x)) if x else 0.0
        nb = math.sqrt(_norm2(y)) if y else 0.0
        if x is not None and y is not None and torch.equal(x.a, y.a) and torch.equal(x.b, y.b):
            d, cos = 0.0, 1.0 if na > 0 else None  # identical factors: exactly zero, not rounding noise
        elif x is not None and y is not None:
            ip = _inner(x, y)
            d = math.sqrt(max(na * na + nb * nb - 2 * ip, 0.0))
            cos = ip / (na * nb) if na > 0 and nb > 0 else None
        else:
            d, cos = (na or nb), None
        rel = d / na if na > 0 else (0.0 if d == 0 else math.inf)
        result.modules.append(ModuleDiff(module, na, nb, d, rel, cos))
    result.modules.sort(key=lambda m: -m.difference)
    return result


def _svd_truncate(b: torch.Tensor, a: torch.Tensor, rank: int | None, energy: float | None) -> tuple[
        torch.Tensor, torch.Tensor, float]:
    """Best rank-k factors of ``b @ a`` (k fixed, or the smallest keeping ``energy`` of ‖·‖²); returns
    (b_k, a_k, retained energy)."""
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    total = float((s * s).sum())
    if rank is None:
        cumulative = torch.cumsum(s * s, 0) / max(total, 1e-300)
        rank = int((cumulative < (energy or 1.0) - 1e-12).sum().item()) + 1
    rank = max(1, min(rank, s.numel()))
    kept = float((s[:rank] ** 2).sum()) / total if total > 0 else 1.0
    return (qb @ u[:, :rank]) * s[:rank], (qa @ vh[:rank].T).T, kept


def resize(adapter: Adapter, *, rank: int | None = None, energy: float | None = None) -> tuple[Adapter,
                                                                                              dict[str, float]]:
    """SVD-truncate each module's delta to ``rank``, or to the smallest rank keeping ``energy`` of it."""
    if (rank is None) == (energy is None):
        raise InputError("give exactly one of --rank and --energy")
    check_rank(rank)
    check_energy(energy)
    factors, retained = {}, {}
    for module, f in _factors(adapter).items():
        b, a, kept = _svd_truncate(f.b, f.a, rank, energy)
        factors[module] = LowRank(b, a, f.kind, f.kernel)
        retained[module] = kept
    method = capability(registry.get_method(adapter.method), "algebra", LowRankAlgebra)
    return method.from_low_rank(adapter, factors, _full_tensors(adapter)), retained


def _full_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    """Tensors that are not factors (modules_to_save, saved base layers, token rows), carried unchanged."""
    return {n: adapter.tensor(n) for n in adapter.tensor_names()
            if n.rpartition(".")[2].startswith("replace_") or n.endswith(".trainable_tokens")}


COMBINATIONS = ("cat", "linear", "svd", "ties", "dare")


def layer_stacks(adapter: Adapter) -> set[str]:
    """Where an adapter's modules sit in their model: each module path up to its first layer number
    (``model.layers``, ``transformer.h``); a module outside any numbered stack counts by its full path."""
    stacks = set()
    for module in adapter.modules():
        parts = module.split(".")
        digits = [i for i, p in enumerate(parts) if p.isdigit()]
        stacks.add(".".join(parts[: digits[0]]) if digits else module)
    return stacks


def _check_same_model(adapters: Sequence[Adapter]) -> None:
    """Refuse adapters made for different models: their modules lie in different layer stacks (a Llama's
    ``model.layers`` against a GPT-2's ``transformer.h``), their stored orientation differs
    (``fan_in_fan_out``), or one module has different input or output sizes in the two."""
    first = adapters[0]
    for other in adapters[1:]:
        why = None
        if first.modules() and other.modules() and not layer_stacks(first) & layer_stacks(other):
            why = (f"their modules lie in different models ({', '.join(sorted(layer_stacks(first))[:2])} against "
                   f"{', '.join(sorted(layer_stacks(other))[:2])})")
        elif bool(first.config.get("fan_in_fan_out")) != bool(other.config.get("fan_in_fan_out")):
            why = "one stores its layers transposed (fan_in_fan_out, GPT-2 Conv1D) and the other does not"
        else:
            for module in sorted(set(first.modules()) & set(other.modules())):
                sizes = [_in_out(a, module) for a in (first, other)]
                if None not in sizes and sizes[0] != sizes[1]:
                    why = f"{module} has (out, in) {sizes[0]} in one and {sizes[1]} in the other"
                    break
        if why:
            names = [a.base.name for a in (first, other)]
            made = f" (made for {names[0]} and {names[1]})" if all(names) and names[0] != names[1] else ""
            raise IncompatibleBaseError(f"these adapters cannot be combined: {why}{made}", path=other.source,
                                        hint="combine adapters trained on the same base model")


def _in_out(adapter: Adapter, module: str) -> tuple[int, int] | None:
    roles = adapter.modules()[module]
    a, b = roles.get("lora_A") or roles.get("lora_embedding_A"), roles.get("lora_B") or roles.get("lora_embedding_B")
    if not (a and b) or len(adapter.info(a).shape) < 2 or len(adapter.info(b).shape) < 2:
        return None
    return adapter.info(b).shape[0], adapter.info(a).shape[1]


def ties_merge(deltas: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """TIES on full deltas (Yadav et al.): keep each delta's top-``density`` entries by magnitude, elect
    each entry's sign from the sum of the trimmed deltas, and average the weighted entries that agree."""
    trimmed = []
    for d in deltas:
        k = max(1, int(round(density * d.numel())))
        threshold = d.abs().flatten().kthvalue(d.numel() - k + 1).values
        trimmed.append(torch.where(d.abs() >= threshold, d, torch.zeros_like(d)))
    stacked = torch.stack(trimmed)
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    weighted = torch.stack([w * t for w, t in zip(weights, trimmed)])
    count = agree.sum(0).clamp(min=1)
    return (weighted * agree).sum(0) / count


def dare_merge(deltas: list[torch.Tensor], weights: list[float], density: float, seed: int) -> torch.Tensor:
    """DARE (Yu et al.): drop each entry with probability 1 − density (seeded), rescale by 1/density, sum."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.zeros_like(deltas[0])
    for w, d in zip(weights, deltas):
        keep = torch.rand(d.shape, generator=gen, dtype=torch.float64) < density
        out += w * torch.where(keep, d / density, torch.zeros_like(d))
    return out


def combine(adapters: Sequence[Adapter], weights: Sequence[float] | None = None, how: str = "cat",
            rank: int | None = None, density: float = 0.5, seed: int = 0) -> Adapter:
    """Weighted combination of adapters of one method, defined on the deltas ``Σ w_i ΔW_i``.

    - ``cat``: exact; rank Σ r_i (zero-weight adapters dropped; one adapter of weight 1 comes back as is).
    - ``svd``: the exact sum truncated by SVD to ``rank`` (default: the largest input rank).
    - ``linear``: PEFT's ``add_weighted_adapter`` linear (A and B summed with √|w·s|, equal ranks), with the
      scaling of each module folded in first, so rsLoRA and patterns come out right. Approximate by nature
      (cross terms), exact for a single adapter.
    - ``ties`` / ``dare``: TIES (trim to ``density``, elect signs, disjoint mean) or DARE (random drop at
      ``1 - density``, seeded, rescaled) on each module's *full* delta, one module at a time, then truncated
      to ``rank`` by SVD (PEFT's ``*_svd`` variants; its plain variants act on A and B separately, which
      is not the same operation).
    """
    if how not in COMBINATIONS:
        raise InputError(f"unknown combination {how!r}", hint=f"use one of {', '.join(COMBINATIONS)}")
    weights = list(weights) if weights else [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise InputError(f"{len(weights)} weights for {len(adapters)} adapters")
    for w in weights:
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or abs(w) > 1e6:
            raise InputError(f"every --weight must be a finite number of size at most 1e6, got {w!r}")
    check_rank(rank)
    if not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise InputError(f"density must be in (0, 1], got {density!r}")
    if len({a.method for a in adapters}) != 1:
        raise UnsupportedOperationError("adapters of different methods cannot be combined")
    _check_same_model(adapters)
    live = [(a, w) for a, w in zip(adapters, weights) if w != 0]
    if not live:
        raise InputError("every weight is zero: nothing to combine")
    if len(live) == 1 and live[0][1] == 1.0 and how in ("cat", "linear"):
        return live[0][0]  # the identity combination: the adapter itself, bit for bit
    all_factors = [_factors(a) for a, _ in live]
    extra: dict[str, torch.Tensor] = {}
    for adapter, _ in live:
        for name, tensor in _full_tensors(adapter).items():
            if name in extra:
                raise IncompatibleBaseError(f"two adapters replace {name}", path=adapter.source,
                                            hint="combine them without one of these modules_to_save")
            extra[name] = tensor
    modules = sorted({m for f in all_factors for m in f})
    out: dict[str, LowRank] = {}
    for module in modules:
        parts = [(f[module], w) for f, (_, w) in zip(all_factors, live) if module in f]
        kind, kernel = parts[0][0].kind, parts[0][0].kernel
        if any(p.kernel != kernel for p, _ in parts):
            raise IncompatibleBaseError(f"these adapters cannot be combined: {module} is a conv layer with kernel "
                                        f"{sorted({p.kernel for p, _ in parts})} in different adapters",
                                        hint="combine adapters trained on the same base model")
        if how in ("ties", "dare"):
            full = [p.b @ p.a for p, _ in parts]
            ws = [w for _, w in parts]
            merged = ties_merge(full, ws, density) if how == "ties" else dare_merge(full, ws, density, seed)
            target = rank or max(p.rank for p, _ in parts)
            u, sv, vh = torch.linalg.svd(merged, full_matrices=False)
            target = min(target, sv.numel())
            out[module] = LowRank(u[:, :target] * sv[:target], vh[:target], kind, kernel)
            continue
        if how == "cat" or how == "svd":
            b = torch.cat([p.b * w for p, w in parts], dim=1)
            a = torch.cat([p.a for p, _ in parts], dim=0)
            if how == "svd":
                target = rank or max(p.rank for p, _ in parts)
                b, a, _ = _svd_truncate(b, a, target, None)
            out[module] = LowRank(b, a, kind, kernel)
        else:
            ranks = {p.rank for p, _ in parts}
            if len(ranks) != 1:
                raise UnsupportedOperationError(f"linear combination needs equal ranks; {module} has {sorted(ranks)}",
                                                hint="use --how cat (exact) or --how svd")
            b = torch.stack([math.sqrt(abs(w)) * p.b for p, w in parts]).sum(0)
            a = torch.stack([math.copysign(math.sqrt(abs(w)), w) * p.a for p, w in parts]).sum(0)
            out[module] = LowRank(b, a, kind, kernel)
    method = capability(registry.get_method(live[0][0].method), "algebra", LowRankAlgebra)
    return method.from_low_rank(live[0][0], out, extra)
