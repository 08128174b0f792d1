"""What LoHa and LoKr (PEFT's LyCORIS methods) share: ``r``/``alpha`` with rank and alpha patterns, a delta
computed whole from the factors and scaled by ``alpha / r``, added to the weight (Linear, Conv2d, Conv1d;
``plugins/peft/additive.py`` adds it and hooks the unmerged forward ``base(x) + F.linear(x, delta)`` or the
conv), their common lint flow, and conversion to plain LoRA through exact low-rank factors of the delta.
Each method supplies its tensors, delta and factors (``docs/methods.md``, LoHa and LoKr)."""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping
from typing import Any

import torch

from adaptools.plugin import Adapter, BaseInfo, Finding, IncompatibleBaseError, LowRank, UnsupportedOperationError

from ..lora.from_factors import ViaPlainLoRA
from ..peft.additive import AdditiveDelta, Delta, Path, layer_path
from ..peft.common import weight_of
from ..peft.config_schema import ALPHA, FLAG, PATTERNS, RANK, SHARE, config_schema
from ..peft.lint import Lint, RuleTable
from ..peft.matching import pattern_key

#: The LycorisConfig fields adaptools reads (LoHa and LoKr), their types and ranges, for the type rule.
CONFIG_FIELDS = {"r": RANK, "alpha": ALPHA, "rank_pattern": {**PATTERNS, "additionalProperties": RANK},
                 "alpha_pattern": {**PATTERNS, "additionalProperties": ALPHA}, "rank_dropout": SHARE,
                 "module_dropout": SHARE, "use_effective_conv2d": FLAG}


def lycoris_rank_alpha(config: Mapping[str, Any], module: str) -> tuple[int, Any]:
    """The rank and alpha PEFT gives ``module`` in a LyCORIS config: rank_pattern / alpha_pattern (PEFT's
    pattern rule), else ``r`` / ``alpha`` (LoRA's alpha field is ``lora_alpha``: lora/config.py)."""
    ranks, alphas = config.get("rank_pattern"), config.get("alpha_pattern")
    ranks = ranks if isinstance(ranks, dict) else {}  # a malformed pattern is a lint finding, not a crash
    alphas = alphas if isinstance(alphas, dict) else {}
    rk, ak = pattern_key(ranks, module), pattern_key(alphas, module)
    rank = ranks[rk] if rk is not None else config.get("r", 8)
    alpha = alphas[ak] if ak is not None else config.get("alpha", 8)
    return int(rank), alpha


def config_rank(config: Mapping[str, Any], module: str) -> int | None:
    """The module's rank from the config, or None when the config is malformed (reported by the type rule)."""
    try:
        return lycoris_rank_alpha(config, module)[0]
    except (TypeError, ValueError):
        return None


def fits(delta_shape: tuple[int, ...], base_shape: tuple[int, ...]) -> bool:
    """Whether a delta of ``delta_shape`` lands on a weight of ``base_shape``: equal for a Linear; for a conv,
    PEFT reshapes, so the element counts must agree."""
    if len(base_shape) == 2:
        return tuple(delta_shape) == tuple(base_shape)
    return math.prod(delta_shape) == math.prod(base_shape)


class Lycoris(AdditiveDelta, ViaPlainLoRA):
    """A LyCORIS-style method: subclasses give the roles, the delta, its shape and its low-rank factors."""

    #: The method's rule table (``rules`` is ``table.rules``); the common checks take their ids from it.
    table: RuleTable
    #: Config fields of the method's own, beyond :data:`CONFIG_FIELDS`, with their schemas.
    extra_fields: Mapping[str, Any] = {}

    @abstractmethod
    def delta(self, tensors: Mapping[str, torch.Tensor], scaling: float) -> torch.Tensor:
        """The module's scaled delta from its fp32 tensors, exactly as PEFT's get_delta_weight (not reshaped)."""

    @abstractmethod
    def delta_shape(self, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...] | None:
        """The shape :meth:`delta` returns, from the tensor shapes; None if they are inconsistent."""

    @abstractmethod
    def factors(self, tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, a) in float64 with ``b @ a`` equal to the unscaled delta of a Linear module."""

    @abstractmethod
    def lint_module(self, report: Lint, module: str, roles: dict[str, str], base_shape: tuple[int, ...] | None) -> None:
        """The method's own checks of one module (presence, ranks, shapes against the config); ``base_shape``
        is the weight's shape when checked against a base."""

    def layer_refusal(self, roles: Mapping[str, str], weight_shape: tuple[int, ...]) -> str | None:
        """Why a module cannot be merged or applied onto a weight of this shape (None: it can)."""
        return None

    # --- shared plumbing -----------------------------------------------------------------------------------

    def anchor(self, module: str, roles: Mapping[str, str]) -> str | None:
        """The tensor that names an adapted module in messages (None: the module only has full tensors)."""
        return next((roles[r] for r in self.roles if r in roles), None)

    def _shapes(self, adapter: Adapter, roles: Mapping[str, str]) -> dict[str, tuple[int, ...]]:
        return {r: tuple(adapter.info(n).shape) for r, n in roles.items() if r in self.roles}

    def _tensors(self, adapter: Adapter, roles: Mapping[str, str], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        return {r: adapter.tensor(n).to(device=device, dtype=dtype) for r, n in roles.items() if r in self.roles}

    def scaling(self, config: Mapping[str, Any], module: str) -> float:
        rank, alpha = lycoris_rank_alpha(config, module)
        scaling: float = alpha / rank
        return scaling

    def lint(self, adapter: Adapter, base: BaseInfo | None = None, *, check_values: bool = True) -> list[Finding]:
        report = Lint(adapter, self.table)
        if not report.config(config_schema({**CONFIG_FIELDS, **self.extra_fields})):
            return report.unusable_config(self.roles, check_values)
        r = adapter.config.get("r", 8)
        if isinstance(r, int) and not isinstance(r, bool) and r <= 0:
            report.add(self.table.ids["type"], f"r is {r}", field="r")
        report.roles(self.roles)
        for module, roles in adapter.modules().items():
            anchor = self.anchor(module, roles)
            if anchor is None:
                continue
            found = report.base_tensor(base, module, anchor) if base is not None else None
            self.lint_module(report, module, roles, tuple(found.shape) if found is not None else None)
            report.targeted(module, anchor)
            shape = self.delta_shape(self._shapes(adapter, roles))
            if found is not None and shape is not None and not fits(shape, tuple(found.shape)):
                report.add(self.table.ids["fit"], f"the delta {list(shape)} does not fit base {found.name} "
                           f"{list(found.shape)}", anchor)
        if check_values:
            report.finite()
            report.no_effect({m for m, roles in adapter.modules().items() if self.anchor(m, roles)})
        return report.findings

    def summary(self, adapter: Adapter) -> dict[str, Any]:
        config = adapter.config
        modules = [m for m, roles in adapter.modules().items() if self.anchor(m, roles)]
        ranks = sorted({lycoris_rank_alpha(config, m)[0] for m in modules})
        return {"rank": ranks[0] if len(ranks) == 1 else ranks, "alpha": config.get("alpha"),
                "rank_pattern": config.get("rank_pattern") or None,
                "alpha_pattern": config.get("alpha_pattern") or None,
                "use_effective_conv2d": bool(config.get("use_effective_conv2d")),
                "target_modules": config.get("target_modules"), "adapted_modules": len(modules)}

    # --- merge and unmerged forward (the adding: plugins/peft/additive.py) -------------------------------------

    def module_delta(self, adapter: Adapter, module: str, roles: Mapping[str, str], target: str,
                     base_shape: tuple[int, ...], shared: Any) -> Delta:
        anchor = self.anchor(module, roles)
        assert anchor is not None  # the base merges anchored modules only
        shape = self.delta_shape(self._shapes(adapter, roles))
        why = self.layer_refusal(roles, base_shape)
        if why:
            raise UnsupportedOperationError(f"cannot merge {module}: {why}", **adapter.where(anchor))
        if shape is None or not fits(shape, base_shape):
            raise IncompatibleBaseError(f"{self.name} factors of {module} (delta {shape}) do not fit base "
                                        f"{target} {list(base_shape)}", **adapter.where(anchor),
                                        hint="the adapter was made for another model size")
        scaling = self.scaling(adapter.config, module)
        return lambda current: self.delta(self._tensors(adapter, roles, current.device), scaling).reshape(current.shape)

    def module_path(self, adapter: Adapter, module: str, roles: Mapping[str, str], layer: torch.nn.Module,
                    shared: Any) -> Path:
        anchor, weight = self.anchor(module, roles), weight_of(layer)
        assert anchor is not None  # the base hooks anchored modules only
        why = self.layer_refusal(roles, tuple(weight.shape))
        if why:
            raise UnsupportedOperationError(f"cannot apply {module}: {why}", **adapter.where(anchor))
        delta = self.delta(self._tensors(adapter, roles), self.scaling(adapter.config, module)).reshape(weight.shape)
        return lambda mod, x: layer_path(mod, x, delta)

    # --- algebra and conversion to plain LoRA (plugins/lora/from_factors.py) ---------------------------------

    def low_rank(self, adapter: Adapter) -> dict[str, LowRank]:
        """Each Linear module's delta as exact float64 factors (scaling folded into ``b``)."""
        out = {}
        for module, roles in adapter.modules().items():
            anchor = self.anchor(module, roles)
            if anchor is None:
                continue
            shape = self.delta_shape(self._shapes(adapter, roles))
            if shape is None or len(shape) != 2 or any(len(s) != 2 for s in self._shapes(adapter, roles).values()):
                raise UnsupportedOperationError(f"conv {self.name} modules are not supported by adapter algebra yet",
                                                **adapter.where(anchor))
            b, a = self.factors(self._tensors(adapter, roles, dtype=torch.float64))
            out[module] = LowRank(b * self.scaling(adapter.config, module), a, "linear")
        return out
