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

from collections.abc import Callable, Mapping
from typing import Any

import torch

from adaptools.plugin import Adapter, BaseInfo, Finding, IncompatibleBaseError, LowRank, UnsupportedOperationError

from ..peft.additive import AdditiveDelta, Delta, Path, layer_path
from ..peft.common import weight_layout, weight_of
from ..peft.config_schema import ALPHA, PATTERNS, SIZE, config_schema
from ..peft.lint import CORRUPT, FOREIGN_CONFIG, INCOMPLETE, Lint, Rule, rule_table
from .from_factors import ViaPlainLoRA

ROLES = ("lora_A", "lora_B", "lora_E")

TABLE = rule_table("ADALORA", {
    1: "type", 2: "role", 3: "dtype",
    4: Rule("error", "lora_A, lora_B and lora_E are not all present", INCOMPLETE),
    5: Rule("error", "lora_A, lora_B and lora_E do not share a rank", CORRUPT),
    6: Rule("error", "rank differs from init_r / the rank_pattern mask", FOREIGN_CONFIG),
    7: "target", 8: "values", 9: "zero", 10: "missing", 11: "fit", 12: "inert",
}, method="AdaLoRA", config="AdaLoraConfig", zero="lora_E is all zero: the module changes nothing")
#: The AdaLoraConfig fields adaptools reads, their types and ranges (a pruned rank_pattern's masks, one
#: true/false per initial rank, are checked against init_r by the lint below).
CONFIG_SCHEMA = config_schema({"init_r": SIZE, "lora_alpha": ALPHA, "rank_pattern": PATTERNS})


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


def _layout(base_shape: tuple[int, ...], a_shape: tuple[int, ...], b_shape: tuple[int, ...],
            config: Mapping[str, Any]) -> str | None:
    """How factors ``lora_A`` / ``lora_B`` land on a weight (a Conv2d's A holds in·kh·kw columns)."""
    return weight_layout(base_shape, b_shape[0], a_shape[1], bool(config.get("fan_in_fan_out")), conv=True)


class AdaLoRA(AdditiveDelta, ViaPlainLoRA):
    name = "adalora"
    description = "AdaLoRA (PEFT ADALORA): SVD-form LoRA with pruned ranks; converts exactly to plain LoRA"
    roles = ROLES
    peft_types = ("ADALORA",)
    peft_roles = {"lora_A": "lora_A", "lora_B": "lora_B", "lora_E": "lora_E"}
    rules = TABLE.rules
    check_only = frozenset({TABLE.ids["inert"]})
    fp32_output = True  # the unmerged path is added to the layer's output in fp32

    # --- check ------------------------------------------------------------------------------------

    def lint(self, adapter: Adapter, base: BaseInfo | None = None, *, check_values: bool = True) -> list[Finding]:
        report = Lint(adapter, TABLE)
        if not report.config(CONFIG_SCHEMA):
            return report.unusable_config(ROLES, check_values)
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
        report.roles(ROLES)
        for module, roles in adapter.modules().items():
            self._lint_module(report, module, roles, valid_init)
            if base is not None and "lora_A" in roles and "lora_B" in roles:
                self._lint_base(report, base, module, roles)
        if check_values:
            report.finite()
            report.zeros("lora_E", rows=True)
            report.no_effect({m for m, roles in adapter.modules().items() if "lora_E" in roles})
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
        report.targeted(module, roles["lora_A"])

    def _lint_base(self, report: Lint, base: BaseInfo, module: str, roles: dict[str, str]) -> None:
        found = report.base_tensor(base, module, roles["lora_A"])
        if found is None:
            return
        a, b = report.adapter.info(roles["lora_A"]).shape, report.adapter.info(roles["lora_B"]).shape
        if len(a) == 2 and len(b) == 2 and _layout(tuple(found.shape), a, b, report.adapter.config) is None:
            report.add("ADALORA011", f"lora_A {list(a)} x lora_B {list(b)} do not fit base {found.name} "
                       f"{list(found.shape)}", roles["lora_A"])

    def summary(self, adapter: Adapter) -> dict[str, Any]:
        config = adapter.config
        ranks = sorted({adapter.info(roles["lora_A"]).shape[0] for roles in adapter.modules().values()
                        if "lora_A" in roles})
        return {"init_r": config.get("init_r"), "target_r": config.get("target_r"),
                "lora_alpha": config.get("lora_alpha"), "ranks": ranks[0] if len(ranks) == 1 else ranks,
                "pruned": bool(config.get("rank_pattern")), "target_modules": config.get("target_modules"),
                "adapted_modules": sum("lora_A" in roles for roles in adapter.modules().values())}

    # --- merge and unmerged forward (the adding: plugins/peft/additive.py) -----------------------------------

    def anchor(self, module: str, roles: Mapping[str, str]) -> str | None:
        return roles.get("lora_A")

    def source(self, roles: Mapping[str, str]) -> str:
        return ", ".join(roles[r] for r in ROLES)

    def module_delta(self, adapter: Adapter, module: str, roles: Mapping[str, str], target: str,
                     base_shape: tuple[int, ...], shared: Any) -> Delta:
        a_shape, b_shape = adapter.info(roles["lora_A"]).shape, adapter.info(roles["lora_B"]).shape
        layout = _layout(base_shape, a_shape, b_shape, adapter.config)
        if layout is None:
            raise IncompatibleBaseError(f"AdaLoRA factors {list(a_shape)} x {list(b_shape)} do not fit base "
                                        f"{target} {list(base_shape)}", **adapter.where(roles["lora_A"]),
                                        hint="the adapter was made for another model size")
        _, scaling, ranknum = module_scales(adapter.config, module)

        def delta(current: torch.Tensor) -> torch.Tensor:
            a, b, e = (adapter.tensor(roles[r]).to(current.device).float() for r in ROLES)
            # PEFT's SVDLinear.get_delta_weight, in its order: (B @ (A*E)), transposed, *scaling, /(ranknum+1e-5)
            d = b @ (a * e)
            if layout == "fan_in_fan_out":
                d = d.T
            d = d * scaling / _divisor(ranknum).to(current.device)
            return d.reshape(current.shape) if layout == "conv" else d

        return delta

    def module_path(self, adapter: Adapter, module: str, roles: Mapping[str, str], layer: torch.nn.Module,
                    shared: Any) -> Path:
        """PEFT's unmerged AdaLoRA path, ``(x @ (A*E)ᵀ @ Bᵀ) · scaling / ranknum`` (a Conv2d: the layer's conv
        of the delta)."""
        a, b, e = (adapter.tensor(roles[r]).float() for r in ROLES)
        _, scaling, ranknum = module_scales(adapter.config, module)
        divisor = _divisor(ranknum)
        if isinstance(layer, torch.nn.Conv2d):
            w = (b @ (a * e) * scaling / divisor).reshape(weight_of(layer).shape)
            return lambda mod, x: layer_path(mod, x, w)
        return lambda mod, x: (x @ (a * e).T @ b.T) * scaling / divisor

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

    def to_plain(self, adapter: Adapter, base: BaseInfo | None, read: Callable[[str], torch.Tensor] | None,
                 initial: Adapter | None, options: Mapping[str, Any] | None = None) -> Adapter:
        """The same adapter as plain LoRA of the same ranks: ``A' = A ⊙ E``, ``B' = B · s`` (``convert --to lora``)."""
        for module, roles in adapter.modules().items():
            if "lora_A" in roles and len(adapter.info(roles["lora_A"]).shape) != 2:
                raise UnsupportedOperationError("a conv AdaLoRA module has no plain-LoRA form here yet",
                                                **adapter.where(roles["lora_A"]))
        return super().to_plain(adapter, base, read, initial, options)
