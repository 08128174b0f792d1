"""LoRA on fused mixture-of-experts parameters (PEFT ``target_parameters``, its ``ParamWrapper``).

PEFT wraps an ``nn.Parameter`` (transformers 5's fused ``mlp.experts.gate_up_proj`` ``[E, ., .]``) instead of a
module. Its saved keys do not name the parameter: the first wrapped parameter of a module is the innermost
wrapper, each later one wraps it again, so ``experts.base_layer.lora_A`` is the first and ``experts.lora_A``
the last. The tensors hold every expert at once: ``lora_A [r·E, in]`` expert-major rows, ``lora_B [out, r·E]``
expert-minor columns. The checkpoint may hold the fused parameter (gpt-oss) or one tensor per expert
(Qwen3-MoE, Mixtral: transformers 5 converts them on load). docs/peft.md, "LoRA on fused MoE experts", has
every rule used here; this module only turns them into names, shapes and the delta.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from adaptools.plugin import Adapter, BaseInfo, IncompatibleBaseError, InputError, TensorUpdate

from ..peft.matching import is_targeted
from .config import lora_rank_alpha, scaling_for

#: The order transformers' expert classes register their parameters in, which is PEFT's wrapping order.
REGISTRATION_ORDER = ("gate_up_proj", "gate_proj", "up_proj", "down_proj")
#: Per-expert checkpoint spellings of a fused parameter: (expert module prefix rewrite, tensors whose rows
#: are concatenated, in order). transformers' conversion mappings ``qwen2_moe`` and ``mixtral``.
PER_EXPERT: dict[str, tuple[tuple[tuple[str, str], tuple[str, ...]], ...]] = {
    "gate_up_proj": (((".experts", ".experts"), ("gate_proj", "up_proj")),
                     ((".mlp.experts", ".block_sparse_moe.experts"), ("w1", "w3"))),
    "down_proj": (((".experts", ".experts"), ("down_proj",)),
                  ((".mlp.experts", ".block_sparse_moe.experts"), ("w2",))),
}
#: model_type values whose expert classes store ``[E, in, out]`` (their ``is_transposed``, which PEFT reads);
#: every other fused parameter is ``[E, out, in]``.
TRANSPOSED_MODEL_TYPES = ("gpt_oss", "ergo", "openai_privacy_filter", "aria", "aria_text")
#: PEFT's ParamWrapper casts the delta to a 16-bit parameter's dtype before adding it (two roundings, unlike
#: lora.Linear); the merge does the same so that it equals ``merge_and_unload`` bit for bit.
DELTA_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16}
_BASE_LAYERS = re.compile(r"(\.base_layer)+$")


def targets(config: Mapping[str, Any]) -> list[str]:
    """The config's ``target_parameters`` as a list of strings (anything else: none)."""
    value = config.get("target_parameters")
    return [t for t in value if isinstance(t, str)] if isinstance(value, list) else []


def unwrapped(module: str) -> tuple[str, int]:
    """A saved module path -> (the module holding the parameter, wrapper depth from the outside)."""
    found = _BASE_LAYERS.search(module)
    if not found:
        return module, 0
    return module[:found.start()], found.group(0).count(".base_layer")


def candidates(config: Mapping[str, Any], module: str) -> list[str]:
    """Parameter names ``target_parameters`` selects on ``module``, in wrapping order (PEFT matches the key
    ``<module>.<param>`` equal to an entry or ending with ``.`` + entry)."""
    names = []
    for entry in targets(config):
        owner, _, param = entry.rpartition(".")
        if param and (not owner or module == owner or module.endswith("." + owner)) and param not in names:
            names.append(param)
    known = [n for n in REGISTRATION_ORDER if n in names]
    return known + [n for n in names if n not in known]


def expert_modules(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, str | None]:
    """Saved module path -> ``<module>.<param>`` it adapts (None: cannot tell from the config), for every
    module with factors that ``target_parameters`` explains."""
    levels: dict[str, set[int]] = {}
    for name in shapes:
        module, _, role = name.rpartition(".")
        if role == "lora_A":
            owner, depth = unwrapped(module)
            if candidates(config, owner) and (depth or not _module_target(config, owner)):
                levels.setdefault(owner, set()).add(depth)
    found: dict[str, str | None] = {}
    for owner, depths in levels.items():
        names = candidates(config, owner)
        count = max(depths) + 1
        for depth in depths:
            saved = owner + ".base_layer" * depth
            found[saved] = f"{owner}.{names[count - 1 - depth]}" if len(names) == count else None
    return found


def module_entry(config: Mapping[str, Any], parameter: str | None, shape: tuple[int, ...]) -> dict[str, Any]:
    """The canonical ``modules`` entry of a ParamWrapper level: rank and alpha are the parameter path's (PEFT's
    key for rank_pattern / alpha_pattern), the saved rank is ``r · E``, so E is lora_A's rows over r."""
    entry: dict[str, Any] = {"kind": "experts", "parameter": parameter, "rank": None, "alpha": None,
                             "scaling": None, "experts": None}
    if parameter is None:
        return entry
    try:
        rank, alpha = lora_rank_alpha(config, parameter)
        entry.update(rank=rank, alpha=alpha, scaling=scaling_for(config, rank, alpha))
    except (TypeError, ValueError, ZeroDivisionError, InputError):
        return entry  # lint reports the field (LORA001, LORA020)
    if rank > 0 and int(shape[0]) % rank == 0:
        entry["experts"] = int(shape[0]) // rank
    return entry


def _module_target(config: Mapping[str, Any], module: str) -> bool:
    """True when ``target_modules`` selects ``module`` itself: a LoRA on the module, never a ParamWrapper
    (PEFT refuses to wrap a parameter of a module it also targets)."""
    try:
        return is_targeted(config, module)
    except InputError:  # a pattern that fails: lint reports it (LORA020)
        return False


@dataclass(frozen=True)
class Target:
    """Where a fused parameter's delta lands in the checkpoint.

    ``fused``: one tensor ``[E, out, in]`` (``transposed``: ``[E, in, out]``) or 2-D ``[out, in]``.
    Otherwise ``pieces[e]`` lists, per expert, (tensor, first row, rows) of a per-expert checkpoint."""

    experts: int
    out_features: int
    in_features: int
    fused: str | None = None
    transposed: bool = False
    pieces: tuple[tuple[tuple[str, int, int], ...], ...] = ()

    def names(self) -> list[str]:
        return [self.fused] if self.fused else [name for expert in self.pieces for name, _, _ in expert]


def locate(base: BaseInfo, parameter: str) -> Target | str:
    """The checkpoint tensors that hold ``parameter`` (``<module>.<param>``), or why there are none."""
    owner, _, param = parameter.rpartition(".")
    fused = base.locate(owner, param)
    if fused is not None:
        shape = tuple(base.find(fused).shape)  # type: ignore[union-attr]
        if len(shape) == 2:
            return Target(1, shape[0], shape[1], fused=fused)
        if len(shape) != 3:
            return f"{fused} has {len(shape)} dimensions {list(shape)}; a fused expert parameter has 2 or 3"
        transposed = base.config.get("model_type") in TRANSPOSED_MODEL_TYPES
        return _fused(shape, fused, transposed)
    for (old, new), parts in PER_EXPERT.get(param, ()):
        if owner.endswith(old):
            found = _per_expert(base, owner[: len(owner) - len(old)] + new, parts)
            if found is not None:
                return found
    return f"the base has no {parameter} (fused) nor per-expert tensors for it"


def _per_expert(base: BaseInfo, prefix: str, parts: tuple[str, ...]) -> Target | str | None:
    """Experts ``prefix.<e>.<part>.weight`` for e = 0, 1, ... while every part exists; each expert's parts
    stacked row-wise make its fused slice (transformers' conversion concatenates them so). None: no expert 0."""
    pieces: list[tuple[tuple[str, int, int], ...]] = []
    in_features = None
    while True:
        names = [base.locate(f"{prefix}.{len(pieces)}.{part}", "weight") for part in parts]
        if any(name is None for name in names):
            break
        row, expert = 0, []
        for name in names:
            assert name is not None
            stored = base.find(name)
            shape = tuple(stored.shape) if stored is not None else ()
            in_features = shape[1] if in_features is None and len(shape) == 2 else in_features
            if len(shape) != 2 or shape[1] != in_features:
                return f"{name} {list(shape)} does not line up with expert 0's [*, {in_features}]"
            expert.append((name, row, shape[0]))
            row += shape[0]
        if pieces and row != sum(rows for _, _, rows in pieces[0]):
            return f"expert {len(pieces)} of {prefix} has {row} output rows, expert 0 another count"
        pieces.append(tuple(expert))
    if not pieces or in_features is None:
        return None
    return Target(len(pieces), sum(rows for _, _, rows in pieces[0]), in_features, pieces=tuple(pieces))


def _fused(shape: tuple[int, ...], name: str, transposed: bool) -> Target:
    if transposed:
        return Target(shape[0], shape[2], shape[1], fused=name, transposed=True)
    return Target(shape[0], shape[1], shape[2], fused=name)


def fit_problem(target: Target, a_shape: tuple[int, ...], b_shape: tuple[int, ...], rank: int) -> str | None:
    """Why factors ``lora_A a_shape``, ``lora_B b_shape`` of rank ``rank`` per expert do not fit ``target``."""
    if len(a_shape) != 2 or len(b_shape) != 2:
        return f"lora_A {list(a_shape)} and lora_B {list(b_shape)} must be matrices"
    if rank <= 0 or a_shape[0] % rank:
        return f"lora_A has {a_shape[0]} rows, not a multiple of the rank {rank} per expert"
    experts = a_shape[0] // rank
    if experts != target.experts:
        return (f"the factors hold {experts} experts (lora_A {list(a_shape)} at rank {rank}) but the base has "
                f"{target.experts}")
    if (b_shape[0], a_shape[1]) != (target.out_features, target.in_features):
        return (f"the factors map {a_shape[1]} inputs to {b_shape[0]} outputs per expert, the base's "
                f"{target.names()[0]} {target.in_features} to {target.out_features}")
    return None


def delta(a: torch.Tensor, b: torch.Tensor, experts: int, scaling: float, transposed: bool,
          expert: slice | None = None) -> torch.Tensor:
    """PEFT's ``ParamWrapper.get_delta_weight`` in fp32: ``A`` viewed ``[E, r, in]``, ``B`` ``[out, r, E]``,
    one einsum over the ranks, then times the scaling. ``expert`` restricts it to a range of experts (the same
    einsum on a slice, for per-expert checkpoints)."""
    if experts == 1 and not transposed and expert is None:
        return (b @ a) * scaling  # lora.Linear's delta: a 2-D parameter
    a3 = a.reshape(experts, -1, a.shape[-1])
    b3 = b.reshape(b.shape[0], -1, experts)
    if expert is not None:
        a3, b3 = a3[expert], b3[:, :, expert]
    return torch.einsum("o r e, e r i -> e i o" if transposed else "o r e, e r i -> e o i", b3, a3) * scaling


def describe(config: Mapping[str, Any], module: str) -> str:
    """``module``'s parameter for messages: the resolved ``<module>.<param>``, else the saved path."""
    info = (config.get("modules") or {}).get(module) or {}
    return str(info.get("parameter") or module)


def reach(adapter: Adapter, base: BaseInfo, module: str, roles: dict[str, str]) -> tuple[Target, float] | str:
    """The checkpoint tensors an expert module's factors land on and its scaling, or why they reach none."""
    config = adapter.config
    parameter = ((config.get("modules") or {}).get(module) or {}).get("parameter")
    if not parameter:
        owner, _ = unwrapped(module)
        return (f"cannot tell which of target_parameters {candidates(config, owner)} the factors of {module} "
                "adapt (a wrapper level per targeted parameter is expected)")
    target = locate(base, parameter)
    if isinstance(target, str):
        return target
    rank, alpha = lora_rank_alpha(config, parameter)
    a_shape, b_shape = adapter.info(roles["lora_A"]).shape, adapter.info(roles["lora_B"]).shape
    problem = fit_problem(target, tuple(a_shape), tuple(b_shape), rank)
    return problem if problem else (target, scaling_for(config, rank, alpha))


def merge_updates(adapter: Adapter, base: BaseInfo, module: str, roles: dict[str, str],
                  weight: float) -> list[TensorUpdate]:
    """The updates of one ParamWrapper level: one for a fused parameter, one per tensor of a per-expert
    checkpoint (each expert's slice of the same delta)."""
    a_name, b_name = roles["lora_A"], roles["lora_B"]
    found = reach(adapter, base, module, roles)
    if isinstance(found, str):
        raise IncompatibleBaseError(found, **adapter.where(a_name),
                                    hint="the adapter was made for another model (check base_model_name_or_path)")
    target, scaling = found
    s = scaling * weight
    source = f"{a_name}, {b_name}"

    def factors(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return adapter.tensor(a_name).to(device).float(), adapter.tensor(b_name).to(device).float()

    def rounded(d: torch.Tensor, name: str) -> torch.Tensor:
        found = base.find(name)
        dtype = DELTA_DTYPES.get(found.dtype) if found is not None else None
        return d if dtype is None else d.to(dtype).float()

    if target.fused:
        fused_name = target.fused

        def fused(current: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
            a, b = factors(current.device)
            if current.dim() == 2:
                return current + rounded(delta(a, b, 1, s, False), fused_name)
            # expert by expert, in place: the same einsum on a slice gives the same bits (tested), and no
            # second tensor the size of the whole expert stack is made
            for e in range(target.experts):
                current[e] += rounded(delta(a, b, target.experts, s, target.transposed, slice(e, e + 1))[0],
                                      fused_name)
            return current

        return [TensorUpdate(target.fused, "delta", fused, source=source)]
    updates = []
    for e, expert in enumerate(target.pieces):
        for name, row, rows in expert:
            def piece(current: torch.Tensor, original: torch.Tensor, e: int = e, row: int = row,
                      rows: int = rows, name: str = name) -> torch.Tensor:
                a, b = factors(current.device)
                d = delta(a, b, target.experts, s, False, slice(e, e + 1))[0, row:row + rows]
                return current + rounded(d, name)

            updates.append(TensorUpdate(name, "delta", piece, source=source))
    return updates


def swap_in(adapter: Adapter, module: torch.nn.Module, module_name: str,
            roles: dict[str, str]) -> tuple[torch.nn.Parameter, torch.Tensor]:
    """Runtime application of one ParamWrapper level: the live fused parameter holds ``W + ΔW`` (PEFT's
    unmerged forward parametrizes it the same way) until the caller puts the returned original back."""
    info = (adapter.config.get("modules") or {})[module_name]
    parameter, count = info.get("parameter"), info.get("experts")
    a_name = roles["lora_A"]
    param = getattr(module, str(parameter).rpartition(".")[2], None) if parameter else None
    if not isinstance(param, torch.nn.Parameter) or not count:
        raise IncompatibleBaseError(f"the model has no fused parameter for {describe(adapter.config, module_name)}",
                                    **adapter.where(a_name), hint="load the model with transformers 5 (fused experts)")
    transposed = bool(getattr(module, "is_transposed", False))  # what PEFT's ParamWrapper reads
    a, b = adapter.tensor(a_name).float(), adapter.tensor(roles["lora_B"]).float()
    shape = tuple(param.shape)
    expected: tuple[int, ...] = (count, a.shape[1], b.shape[0]) if transposed else (count, b.shape[0], a.shape[1])
    if len(shape) == 2:
        expected = (b.shape[0], a.shape[1])
    if shape != expected:
        raise IncompatibleBaseError(f"{parameter} is {list(shape)} in the model; the factors need {list(expected)}",
                                    **adapter.where(a_name))
    d = delta(a.to(param.device), b.to(param.device), count, float(info["scaling"]), transposed)
    original = param.data
    param.data = (original.float() + d.reshape(shape)).to(original.dtype)
    return param, original


def swap_in_per_expert(adapter: Adapter, named: Mapping[str, torch.nn.Module], module_name: str,
                       roles: dict[str, str]) -> tuple[torch.nn.Parameter, torch.Tensor] | None:
    """Runtime application of a per-expert LoRA (``…experts.<e>.gate_proj``, transformers 4's modules) on a
    model whose experts are fused: expert ``e``'s rows of the fused parameter get ``s · B @ A`` (the rows
    transformers' conversion gives that module, see PER_EXPERT). None: ``module_name`` is no such module."""
    head, _, part = module_name.rpartition(".")
    owner_experts, _, index = head.rpartition(".")
    if not index.isdigit() or "lora_A" not in roles or "lora_B" not in roles:
        return None
    for param_name, layouts in PER_EXPERT.items():
        for (old, new), parts in layouts:
            if part not in parts or not owner_experts.endswith(new):
                continue
            owner = owner_experts[: len(owner_experts) - len(new)] + old
            module = next((named[c] for c in (owner, owner.partition(".")[2], f"model.{owner}") if c in named), None)
            param = getattr(module, param_name, None)
            if not isinstance(param, torch.nn.Parameter) or param.dim() != 3:
                continue
            transposed = bool(getattr(module, "is_transposed", False))
            a, b = adapter.tensor(roles["lora_A"]).float(), adapter.tensor(roles["lora_B"]).float()
            outputs = param.shape[2] if transposed else param.shape[1]
            rows = outputs // len(parts)
            e, first = int(index), parts.index(part) * rows
            inputs = param.shape[1] if transposed else param.shape[2]
            if e >= param.shape[0] or (b.shape[0], a.shape[1]) != (rows, inputs):
                raise IncompatibleBaseError(f"{module_name} [{b.shape[0]}, {a.shape[1]}] does not fit expert {e} "
                                            f"of {owner}.{param_name} {list(param.shape)}",
                                            **adapter.where(roles["lora_A"]))
            rank, alpha = lora_rank_alpha(adapter.config, module_name)
            d = (b @ a) * scaling_for(adapter.config, rank, alpha)
            original = param.data
            value = original.float().clone()
            if transposed:
                value[e, :, first:first + rows] += d.T
            else:
                value[e, first:first + rows, :] += d
            param.data = value.to(original.dtype)
            return param, original
    return None
