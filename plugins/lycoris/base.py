"""What LoHa and LoKr (PEFT's LyCORIS methods) share: ``r``/``alpha`` with rank and alpha patterns, a delta
computed whole from the factors and scaled by ``alpha / r``, added to the weight (Linear, Conv2d, Conv1d),
the unmerged forward ``base(x) + F.linear(x, delta)`` (or the conv), and conversion to plain LoRA through
exact low-rank factors of the delta. Each method supplies its tensors, delta and factors
(``docs/methods.md``, LoHa and LoKr)."""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from adaptools import plugin
from adaptools.plugin import (
    Adapter,
    BaseInfo,
    IncompatibleBaseError,
    LowRank,
    TensorUpdate,
    UnsupportedOperationError,
)

from ..lora.config import pattern_key
from ..lora.from_factors import full_tensors, plain_lora
from ..peft.common import Lint, hooked, locate, replacement_updates

#: Config fields of PEFT's LycorisConfig subclasses and their types, for the type rule.
CONFIG_TYPES = {"r": int, "alpha": (int, float), "rank_pattern": dict, "alpha_pattern": dict,
                "rank_dropout": (int, float), "module_dropout": (int, float), "use_effective_conv2d": bool,
                "target_modules": (str, list)}


def module_rank_alpha(config: Mapping[str, Any], module: str) -> tuple[int, float]:
    """The rank and alpha PEFT gives ``module``: rank_pattern / alpha_pattern (LoRA's matching), else r / alpha."""
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
        return module_rank_alpha(config, module)[0]
    except (TypeError, ValueError):
        return None


def fits(delta_shape: tuple[int, ...], base_shape: tuple[int, ...]) -> bool:
    """Whether a delta of ``delta_shape`` lands on a weight of ``base_shape``: equal for a Linear; for a conv,
    PEFT reshapes, so the element counts must agree."""
    if len(base_shape) == 2:
        return tuple(delta_shape) == tuple(base_shape)
    return math.prod(delta_shape) == math.prod(base_shape)


class Lycoris(plugin.AdapterMethod, plugin.Mergeable, plugin.LowRankAlgebra, plugin.RuntimeApplicable,
               plugin.PlainConvertible):
    """A LyCORIS-style method: subclasses give the roles, the delta, its shape and its low-rank factors."""

    plain_method = "lora"  # what to_plain returns (convert --to lora)
    #: rule kind -> rule id, for the checks this class runs for its subclasses.
    rule_ids: ClassVar[dict[str, str]]
    fixes: ClassVar[dict[str, str]]

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

    def anchor(self, roles: Mapping[str, str]) -> str | None:
        """The tensor that names an adapted module in messages (None: the module only has full tensors)."""
        return next((roles[r] for r in self.roles if r in roles), None)

    def _shapes(self, adapter: Adapter, roles: Mapping[str, str]) -> dict[str, tuple[int, ...]]:
        return {r: tuple(adapter.info(n).shape) for r, n in roles.items() if r in self.roles}

    def _tensors(self, adapter: Adapter, roles: Mapping[str, str], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        return {r: adapter.tensor(n).to(device=device, dtype=dtype) for r, n in roles.items() if r in self.roles}

    def scaling(self, config: Mapping[str, Any], module: str) -> float:
        rank, alpha = module_rank_alpha(config, module)
        return alpha / rank  # type: ignore[no-any-return]

    def lint(self, adapter: Adapter, base: BaseInfo | None = None, *, check_values: bool = True) -> list[Any]:
        ids = self.rule_ids
        report = Lint(adapter, self.rules, self.fixes)
        report.config_types(ids["type"], {**CONFIG_TYPES, **getattr(self, "extra_types", {})})
        r = adapter.config.get("r", 8)
        if isinstance(r, int) and not isinstance(r, bool) and r <= 0:
            report.add(ids["type"], f"r is {r}", field="r")
        report.roles(ids["role"], ids["dtype"], self.roles)
        for module, roles in adapter.modules().items():
            anchor = self.anchor(roles)
            if anchor is None:
                continue
            found = report.base_tensor(ids["missing"], base, module, anchor) if base is not None else None
            base_shape = tuple(found.shape) if found is not None else None
            self.lint_module(report, module, roles, base_shape)
            report.targeted(ids["target"], module, anchor)
            shape = self.delta_shape(self._shapes(adapter, roles))
            if base_shape is not None and shape is not None and not fits(shape, base_shape):
                report.add(ids["fit"], f"the delta {list(shape)} does not fit base {found.name} "  # type: ignore[union-attr]
                           f"{list(base_shape)}", anchor)
        if check_values:
            report.finite(ids["values"])
        return [f for f in report.findings]

    def summary(self, adapter: Adapter) -> dict[str, Any]:
        config = adapter.config
        modules = [m for m, roles in adapter.modules().items() if self.anchor(roles)]
        ranks = sorted({module_rank_alpha(config, m)[0] for m in modules})
        return {"rank": ranks[0] if len(ranks) == 1 else ranks, "alpha": config.get("alpha"),
                "rank_pattern": config.get("rank_pattern") or None,
                "alpha_pattern": config.get("alpha_pattern") or None,
                "use_effective_conv2d": bool(config.get("use_effective_conv2d")),
                "target_modules": config.get("target_modules"), "adapted_modules": len(modules)}

    # --- merge -------------------------------------------------------------------------------------------

    def merge_updates(self, adapter: Adapter, base: BaseInfo, weight: float = 1.0) -> list[TensorUpdate]:
        updates = replacement_updates(adapter, base)
        for module, roles in adapter.modules().items():
            anchor = self.anchor(roles)
            if anchor is None:
                continue
            target = locate(adapter, base, module, "weight", anchor)
            base_shape = tuple(base.find(target).shape)  # type: ignore[union-attr]
            shape = self.delta_shape(self._shapes(adapter, roles))
            why = self.layer_refusal(roles, base_shape)
            if why:
                raise UnsupportedOperationError(f"cannot merge {module}: {why}", **adapter.where(anchor))
            if shape is None or not fits(shape, base_shape):
                raise IncompatibleBaseError(f"{self.name} factors of {module} (delta {shape}) do not fit base "
                                            f"{target} {list(base_shape)}", **adapter.where(anchor),
                                            hint="the adapter was made for another model size")
            updates.append(TensorUpdate(target, "delta", self._merge_fn(adapter, module, roles, weight),
                                        source=", ".join(n for r, n in roles.items() if r in self.roles)))
        return updates

    def _merge_fn(self, adapter: Adapter, module: str, roles: dict[str, str], weight: float) -> Any:
        scaling = self.scaling(adapter.config, module)

        def fn(current: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
            delta = self.delta(self._tensors(adapter, roles, current.device), scaling).reshape(current.shape)
            return current + (delta if weight == 1.0 else delta * weight)

        return fn

    # --- algebra and conversion to plain LoRA ------------------------------------------------------------------

    def low_rank(self, adapter: Adapter) -> dict[str, LowRank]:
        """Each Linear module's delta as exact float64 factors (scaling folded into ``b``)."""
        out = {}
        for module, roles in adapter.modules().items():
            anchor = self.anchor(roles)
            if anchor is None:
                continue
            shape = self.delta_shape(self._shapes(adapter, roles))
            if shape is None or len(shape) != 2 or any(len(s) != 2 for s in self._shapes(adapter, roles).values()):
                raise UnsupportedOperationError(f"conv {self.name} modules are not supported by adapter algebra yet",
                                                **adapter.where(anchor))
            b, a = self.factors(self._tensors(adapter, roles, dtype=torch.float64))
            out[module] = LowRank(b * self.scaling(adapter.config, module), a, "linear")
        return out

    def from_low_rank(self, template: Adapter, factors: dict[str, LowRank],
                      extra: dict[str, torch.Tensor] | None = None) -> Adapter:
        """Results of adapter algebra are plain LoRA (scale 1) on the template's base."""
        return plain_lora(template, factors, extra)

    def to_plain(self, adapter: Adapter, base: BaseInfo | None, read: Callable[[str], torch.Tensor] | None,
                 initial: Adapter | None, options: Mapping[str, Any] | None = None) -> Adapter:
        """The exact plain LoRA (``convert --to lora``; ``--rank``/``--energy`` then truncate it by SVD)."""
        return plain_lora(adapter, self.low_rank(adapter), full_tensors(adapter))

    # --- runtime application (unmerged) ------------------------------------------------------------------------

    def apply(self, adapter: Adapter, model: torch.nn.Module) -> Any:
        """Forward hooks adding ``F.linear(x, delta)`` (or the conv with the layer's settings), as PEFT does."""

        def install(module: str, roles: dict[str, str], layer: torch.nn.Module) -> list[Any]:
            if self.anchor(roles) is None:
                return []
            why = self.layer_refusal(roles, tuple(layer.weight.shape))
            if why:
                raise UnsupportedOperationError(f"cannot apply {module}: {why}", **adapter.where(self.anchor(roles)))
            delta = self.delta(self._tensors(adapter, roles), self.scaling(adapter.config, module))
            delta = delta.reshape(layer.weight.shape)

            def hook(mod: torch.nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
                x = inputs[0].to(delta.dtype)
                if isinstance(mod, torch.nn.Conv2d):
                    extra = F.conv2d(x, delta, stride=mod.stride, padding=mod.padding, dilation=mod.dilation,
                                     groups=mod.groups)
                elif isinstance(mod, torch.nn.Conv1d):
                    extra = F.conv1d(x, delta, stride=mod.stride, padding=mod.padding, dilation=mod.dilation,
                                     groups=mod.groups)
                else:
                    extra = F.linear(x, delta)
                return (output + extra).to(output.dtype)

            return [layer.register_forward_hook(hook)]

        return hooked(adapter, model, install)
