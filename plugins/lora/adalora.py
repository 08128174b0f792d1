"""AdaLoRA (PEFT ``ADALORA``): LoRA in SVD form, ``delta = B @ (A * E)``, with ranks pruned during training.

Written as a third-party plugin would be: it imports only the public ``adaptools`` API (and the shared
helpers of the built-in PEFT plugins). The tensors, config fields and merge order are in
``docs/methods.md`` (AdaLoRA).

==========  ========================  ==============================
role        shape                     PEFT key suffix
==========  ========================  ==============================
lora_A      [r, in] (conv: in·k·k)    ``lora_A``
lora_B      [out, r]                  ``lora_B``
lora_E      [r, 1]                    ``lora_E``
==========  ========================  ==============================

What is surprising in PEFT: the scaling is ``lora_alpha / (ranknum + 1e-5)`` with ``ranknum`` (not saved)
equal to ``init_r``, not to the module's rank, even after pruning; a module pruned to rank 0 has
``ranknum`` 0 and contributes nothing. The config's ``r`` is ignored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from adaptools import plugin
from adaptools.plugin import (
    Adapter,
    BaseInfo,
    Finding,
    IncompatibleBaseError,
    LowRank,
    TensorUpdate,
    UnsupportedOperationError,
)

from ..peft.common import Lint, hooked, locate, matrix_layout, replacement_updates
from .from_factors import full_tensors, plain_lora

ROLES = ("lora_A", "lora_B", "lora_E")

RULES = {
    "ADALORA001": ("error", "config field has the wrong type"),
    "ADALORA002": ("error", "tensor role unknown to AdaLoRA"),
    "ADALORA003": ("error", "tensor dtype is not floating point"),
    "ADALORA004": ("error", "lora_A, lora_B and lora_E are not all present"),
    "ADALORA005": ("error", "lora_A, lora_B and lora_E do not share a rank"),
    "ADALORA006": ("error", "rank differs from init_r / the rank_pattern mask"),
    "ADALORA007": ("error", "weights on a module target_modules does not select"),
    "ADALORA008": ("error", "NaN or Inf values"),
    "ADALORA009": ("warning", "lora_E is all zero: the module changes nothing"),
    "ADALORA010": ("error", "target module missing from the base"),
    "ADALORA011": ("error", "shape does not fit the base"),
}
FIXES = {
    "ADALORA001": "fix the field in adapter_config.json (see PEFT's AdaLoraConfig)",
    "ADALORA002": "remove the tensor, or install the plugin of the method that uses it",
    "ADALORA003": "save the adapter in fp32, fp16 or bf16",
    "ADALORA004": "the adapter file is incomplete: save it again",
    "ADALORA005": "the adapter file is corrupt: save it again",
    "ADALORA006": "the config does not belong to these weights: ship the matching adapter_config.json",
    "ADALORA007": "add the module to target_modules or drop its tensors",
    "ADALORA008": "the adapter diverged in training or the file is corrupt: retrain or re-save",
    "ADALORA009": "publish the trained checkpoint, not the initial one",
    "ADALORA010": "use the base the adapter was trained on (base_model_name_or_path)",
    "ADALORA011": "use the base the adapter was trained on (model size)",
}
CONFIG_TYPES = {"init_r": int, "lora_alpha": (int, float), "fan_in_fan_out": bool, "rank_pattern": dict,
                "target_modules": (str, list)}


def rank_mask(config: Mapping[str, Any], module: str) -> list[Any] | None:
    """The module's rank_pattern mask (PEFT keys it ``<module>.lora_E``, older saves with the adapter name)."""
    pattern = config.get("rank_pattern") or {}
    for key in (f"{module}.lora_E", f"{module}.lora_E.default"):
        if key in pattern:
            return pattern[key]  # type: ignore[no-any-return]
    return None


def expected_rank(config: Mapping[str, Any], module: str) -> int:
    """The rank PEFT builds ``module`` with: ``init_r``, or the number of kept entries of its rank_pattern mask."""
    mask = rank_mask(config, module)
    return sum(bool(v) for v in mask) if mask is not None else int(config.get("init_r", 12))


def module_scales(config: Mapping[str, Any], module: str) -> tuple[int, float, float]:
    """(expected rank, scaling, ranknum) PEFT gives ``module`` when it loads the adapter.

    Layers are built with ``init_r``; a rank_pattern mask resizes one to ``sum(mask)`` but copies the
    old ``ranknum`` (``init_r``) back, except at rank 0, where it stays 0.
    """
    init_r = int(config.get("init_r", 12))
    rank = expected_rank(config, module)
    alpha = config.get("lora_alpha", 8)
    scaling = alpha if alpha > 0 else float(rank)
    ranknum = float(init_r) if rank > 0 else 0.0
    return rank, scaling, ranknum


def _divisor(ranknum: float) -> torch.Tensor:
    """``ranknum + 1e-5`` as PEFT computes it: an fp32 tensor of shape (1,)."""
    return torch.tensor([ranknum], dtype=torch.float32) + 1e-5


class AdaLoRA(plugin.AdapterMethod, plugin.Mergeable, plugin.LowRankAlgebra, plugin.RuntimeApplicable,
              plugin.PlainConvertible):
    name = "adalora"
    description = "AdaLoRA (PEFT ADALORA): SVD-form LoRA with pruned ranks; converts exactly to plain LoRA"
    roles = ROLES
    peft_types = ("ADALORA",)
    plain_method = "lora"  # what to_plain returns (convert --to lora)
    peft_roles = {"lora_A": "lora_A", "lora_B": "lora_B", "lora_E": "lora_E"}
    rules = RULES

    # --- check ------------------------------------------------------------------------------------

    def lint(self, adapter: Adapter, base: BaseInfo | None = None, *, check_values: bool = True) -> list[Finding]:
        report = Lint(adapter, RULES, FIXES)
        report.config_types("ADALORA001", CONFIG_TYPES)
        config = adapter.config
        init_r = config.get("init_r", 12)
        valid_init = isinstance(init_r, int) and not isinstance(init_r, bool) and init_r >= 0
        if isinstance(init_r, int) and not isinstance(init_r, bool) and init_r < 0:
            report.add("ADALORA001", f"init_r is {init_r}", field="init_r")
        pattern = config.get("rank_pattern")
        if isinstance(pattern, dict):
            for key, mask in pattern.items():
                if not isinstance(mask, list) or not all(isinstance(v, (bool, int)) for v in mask):
                    report.add("ADALORA001", f"rank_pattern[{key!r}] is not a list of booleans", field="rank_pattern")
                    valid_init = False
                elif valid_init and len(mask) != init_r:
                    report.add("ADALORA006", f"rank_pattern[{key!r}] has {len(mask)} entries but init_r is {init_r}",
                               field="rank_pattern")
        report.roles("ADALORA002", "ADALORA003", ROLES)
        for module, roles in adapter.modules().items():
            self._lint_module(report, module, roles, valid_init)
            if base is not None and "lora_A" in roles and "lora_B" in roles:
                self._lint_base(report, base, module, roles)
        if check_values:
            report.finite("ADALORA008")
            for module, roles in adapter.modules().items():
                if "lora_E" in roles and adapter.info(roles["lora_E"]).shape[0] > 0:
                    e = adapter.tensor(roles["lora_E"])
                    if bool(torch.isfinite(e).all()) and not bool(e.any()):
                        report.add("ADALORA009", f"lora_E of {module} is all zero", roles["lora_E"])
        return report.findings

    def _lint_module(self, report: Lint, module: str, roles: dict[str, str], valid_init: bool) -> None:
        present = [r for r in ROLES if r in roles]
        if not present:
            return
        if len(present) != len(ROLES):
            missing = [r for r in ROLES if r not in roles]
            report.add("ADALORA004", f"module {module} has {', '.join(present)} but not {', '.join(missing)}",
                       roles[present[0]])
            return
        a, b, e = (report.adapter.info(roles[r]).shape for r in ROLES)
        if len(a) != 2 or len(b) != 2 or tuple(e) != (a[0], 1) or b[1] != a[0]:
            report.add("ADALORA005", f"lora_A {list(a)}, lora_B {list(b)} and lora_E {list(e)} do not share a rank",
                       roles["lora_A"])
            return
        if valid_init:
            rank = expected_rank(report.adapter.config, module)
            if a[0] != rank:
                report.add("ADALORA006", f"config gives rank {rank} (init_r / rank_pattern) but the tensors have "
                           f"rank {a[0]}", roles["lora_A"], field="init_r")
        report.targeted("ADALORA007", module, roles["lora_A"])

    def _lint_base(self, report: Lint, base: BaseInfo, module: str, roles: dict[str, str]) -> None:
        found = report.base_tensor("ADALORA010", base, module, roles["lora_A"])
        if found is None:
            return
        a, b = report.adapter.info(roles["lora_A"]).shape, report.adapter.info(roles["lora_B"]).shape
        if len(a) == 2 and len(b) == 2 and self._layout(tuple(found.shape), b[0], a[1], report.adapter.config) is None:
            report.add("ADALORA011", f"lora_A {list(a)} x lora_B {list(b)} do not fit base {found.name} "
                       f"{list(found.shape)}", roles["lora_A"])

    @staticmethod
    def _layout(base_shape: tuple[int, ...], out_features: int, in_features: int,
                config: Mapping[str, Any]) -> str | None:
        if len(base_shape) > 2:  # Conv2d: A holds in·kh·kw columns
            return "conv" if base_shape[0] == out_features and math.prod(base_shape[1:]) == in_features else None
        return matrix_layout(base_shape, out_features, in_features, bool(config.get("fan_in_fan_out")))

    def summary(self, adapter: Adapter) -> dict[str, Any]:
        config = adapter.config
        ranks = sorted({adapter.info(roles["lora_A"]).shape[0] for roles in adapter.modules().values()
                        if "lora_A" in roles})
        return {"init_r": config.get("init_r"), "target_r": config.get("target_r"),
                "lora_alpha": config.get("lora_alpha"), "ranks": ranks[0] if len(ranks) == 1 else ranks,
                "pruned": bool(config.get("rank_pattern")), "target_modules": config.get("target_modules"),
                "adapted_modules": sum("lora_A" in roles for roles in adapter.modules().values())}

    # --- merge ---------------------------------------------------------------------------------------

    def merge_updates(self, adapter: Adapter, base: BaseInfo, weight: float = 1.0) -> list[TensorUpdate]:
        updates = replacement_updates(adapter, base)
        for module, roles in adapter.modules().items():
            if "lora_A" in roles:
                updates.append(self._delta_update(adapter, base, module, roles, weight))
        return updates

    def _delta_update(self, adapter: Adapter, base: BaseInfo, module: str, roles: dict[str, str],
                      weight: float) -> TensorUpdate:
        target = locate(adapter, base, module, "weight", roles["lora_A"])
        base_shape = tuple(base.find(target).shape)  # type: ignore[union-attr]
        a_shape, b_shape = adapter.info(roles["lora_A"]).shape, adapter.info(roles["lora_B"]).shape
        layout = self._layout(base_shape, b_shape[0], a_shape[1], adapter.config)
        if layout is None:
            raise IncompatibleBaseError(f"AdaLoRA factors {list(a_shape)} x {list(b_shape)} do not fit base "
                                        f"{target} {list(base_shape)}", **adapter.where(roles["lora_A"]),
                                        hint="the adapter was made for another model size")
        _, scaling, ranknum = module_scales(adapter.config, module)

        def fn(current: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
            a, b, e = (adapter.tensor(roles[r]).to(current.device).float() for r in ROLES)
            # PEFT's SVDLinear.get_delta_weight, in its order: (B @ (A*E)), transposed, *scaling, /(ranknum+1e-5)
            delta = b @ (a * e)
            if layout == "fan_in_fan_out":
                delta = delta.T
            delta = delta * scaling / _divisor(ranknum).to(current.device)
            if layout == "conv":
                delta = delta.reshape(current.shape)
            return current + (delta if weight == 1.0 else delta * weight)

        return TensorUpdate(target, "delta", fn, source=f"{roles['lora_A']}, {roles['lora_B']}, {roles['lora_E']}")

    # --- algebra and conversion to plain LoRA ----------------------------------------------------------

    def low_rank(self, adapter: Adapter) -> dict[str, LowRank]:
        """Per module ``b = B · scaling/(ranknum+1e-5)``, ``a = A ⊙ E`` in float64 (exact: E folds into A's
        rows). Modules pruned to rank 0 change nothing and are left out."""
        factors = {}
        for module, roles in adapter.modules().items():
            if "lora_A" not in roles or adapter.info(roles["lora_A"]).shape[0] == 0:
                continue
            _, scaling, ranknum = module_scales(adapter.config, module)
            a = adapter.tensor(roles["lora_A"]).double() * adapter.tensor(roles["lora_E"]).double()
            b = adapter.tensor(roles["lora_B"]).double() * (scaling / float(_divisor(ranknum)))
            factors[module] = LowRank(b, a, "linear")
        return factors

    def from_low_rank(self, template: Adapter, factors: dict[str, LowRank],
                      extra: dict[str, torch.Tensor] | None = None) -> Adapter:
        """Results of adapter algebra are plain LoRA (scale 1) on the template's base."""
        return plain_lora(template, factors, extra)

    def to_plain(self, adapter: Adapter, base: BaseInfo | None, read: Callable[[str], torch.Tensor] | None,
                 initial: Adapter | None, options: Mapping[str, Any] | None = None) -> Adapter:
        """The same adapter as plain LoRA of the same ranks: ``A' = A ⊙ E``, ``B' = B · s`` (``convert --to lora``)."""
        for module, roles in adapter.modules().items():
            if "lora_A" in roles and len(adapter.info(roles["lora_A"]).shape) != 2:
                raise UnsupportedOperationError("a conv AdaLoRA module has no plain-LoRA form here yet",
                                                **adapter.where(roles["lora_A"]))
        return plain_lora(adapter, self.low_rank(adapter), full_tensors(adapter))

    # --- runtime application (unmerged) ------------------------------------------------------------------

    def apply(self, adapter: Adapter, model: torch.nn.Module) -> Any:
        """Forward hooks adding PEFT's unmerged AdaLoRA path, ``(x @ (A*E)ᵀ @ Bᵀ) · scaling / ranknum``."""

        def install(module: str, roles: dict[str, str], layer: torch.nn.Module) -> list[Any]:
            if "lora_A" not in roles:
                return []
            a, b, e = (adapter.tensor(roles[r]).float() for r in ROLES)
            _, scaling, ranknum = module_scales(adapter.config, module)
            divisor = _divisor(ranknum)
            conv = isinstance(layer, torch.nn.Conv2d)

            def hook(mod: torch.nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
                x = inputs[0].float()
                if conv:
                    w = (b @ (a * e) * scaling / divisor).reshape(mod.weight.shape)
                    extra = F.conv2d(x, w, stride=mod.stride, padding=mod.padding, dilation=mod.dilation,
                                     groups=mod.groups)
                else:
                    extra = (x @ (a * e).T @ b.T) * scaling / divisor
                return (output.float() + extra).to(output.dtype)

            return [layer.register_forward_hook(hook)]

        return hooked(adapter, model, install)
