"""LoHa (PEFT ``LOHA``): the delta is the Hadamard product of two low-rank products, scaled by alpha / r.

Written as a third-party plugin would be (public ``adaptools`` API and the shared PEFT plugin helpers);
``docs/methods.md`` (LoHa) has the tensors, config and merge order.

==========  ==================================  ======================================
role        Linear / Conv (flattened)           Conv with ``use_effective_conv2d``
==========  ==================================  ======================================
hada_w1_a   [out, r]                            [r, out]
hada_w1_b   [r, in] / [r, in·k…]                [r, in]
hada_w2_a   [out, r]                            [r, out]
hada_w2_b   [r, in] / [r, in·k…]                [r, in]
hada_t1/t2  --                                  [r, r, kh, kw] (Conv1d: [r, r, k, 1])
==========  ==================================  ======================================

PEFT key suffixes are the role names (``ParameterDict`` entries, no ``.weight``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..peft.lint import CORRUPT, FOREIGN_CONFIG, INCOMPLETE, Lint, Rule, rule_table
from .base import Lycoris, config_rank

ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
FACTORS = ROLES[:4]

TABLE = rule_table("LOHA", {
    1: "type", 2: "role", 3: "dtype",
    4: Rule("error", "a factor is missing", INCOMPLETE),
    5: Rule("error", "factor shapes disagree", CORRUPT),
    6: Rule("error", "rank differs from r / rank_pattern", FOREIGN_CONFIG),
    7: "target", 8: "values", 9: "zero", 10: "missing", 11: "fit", 12: "inert",
}, method="LoHa", config="LoHaConfig", zero="a factor is all zero: the module changes nothing")


class LoHa(Lycoris):
    name = "loha"
    description = "LoHa (PEFT LOHA): Hadamard product of two low-rank products; Linear and conv layers"
    roles = ROLES
    peft_types = ("LOHA",)
    peft_roles = {role: role for role in ROLES}
    table = TABLE
    rules = TABLE.rules
    check_only = frozenset({TABLE.ids["inert"]})

    def delta(self, tensors: Mapping[str, torch.Tensor], scaling: float) -> torch.Tensor:
        # peft's HadaWeight / HadaWeightCP forward; the scale is a 0-d fp32 tensor there.
        scale = torch.tensor(scaling, device=tensors["hada_w1_a"].device)
        if "hada_t1" in tensors:
            one = torch.einsum("i j k l, j r, i p -> p r k l", tensors["hada_t1"], tensors["hada_w1_b"],
                               tensors["hada_w1_a"])
            two = torch.einsum("i j k l, j r, i p -> p r k l", tensors["hada_t2"], tensors["hada_w2_b"],
                               tensors["hada_w2_a"])
            return one * two * scale
        return ((tensors["hada_w1_a"] @ tensors["hada_w1_b"]) * (tensors["hada_w2_a"] @ tensors["hada_w2_b"])) * scale

    def delta_shape(self, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...] | None:
        if any(r not in shapes or len(shapes[r]) != 2 for r in FACTORS):
            return None
        a1, b1, a2, b2 = (shapes[r] for r in FACTORS)
        if "hada_t1" in shapes:
            t1, t2 = shapes["hada_t1"], shapes.get("hada_t2")
            if t2 != t1 or len(t1) != 4 or a1 != a2 or b1 != b2 or t1[:2] != (a1[0], b1[0]):
                return None
            return (a1[1], b1[1], *t1[2:])
        if a1[1] != b1[0] or a2[1] != b2[0] or (a1[0], b1[1]) != (a2[0], b2[1]):
            return None
        return (a1[0], b1[1])

    def factors(self, tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B1 A1) ⊙ (B2 A2) = (B1 ∗ B2)(A1 • A2): rows of B1 and B2 Kronecker-multiplied (face-splitting
        product), columns of A1 and A2 likewise; rank r1·r2, exact."""
        b1, a1, b2, a2 = (tensors[r] for r in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        b = (b1[:, :, None] * b2[:, None, :]).reshape(b1.shape[0], -1)
        a = (a1[:, None, :] * a2[None, :, :]).reshape(-1, a1.shape[1])
        return b, a

    def lint_module(self, report: Lint, module: str, roles: dict[str, str], base_shape: tuple[int, ...] | None) -> None:
        adapter = report.adapter
        missing = [r for r in FACTORS if r not in roles]
        if ("hada_t1" in roles) != ("hada_t2" in roles):
            missing.append("hada_t2" if "hada_t1" in roles else "hada_t1")
        if missing:
            report.add("LOHA004", f"module {module} lacks {', '.join(missing)}", self.anchor(module, roles))
            return
        shapes = self._shapes(adapter, roles)
        if self.delta_shape(shapes) is None:
            listed = ", ".join(f"{r} {list(s)}" for r, s in shapes.items())
            report.add("LOHA005", f"factor shapes disagree: {listed}", self.anchor(module, roles))
            return
        effective = "hada_t1" in roles
        found = shapes["hada_w1_b"][0]
        rank = config_rank(adapter.config, module)
        if rank is not None and found != rank:
            report.add("LOHA006", f"config gives rank {rank} (r / rank_pattern) but the factors have rank {found}",
                       self.anchor(module, roles), field="r")
        if effective and not adapter.config.get("use_effective_conv2d"):
            report.add("LOHA006", "hada_t1/hada_t2 are saved but use_effective_conv2d is false",
                       roles["hada_t1"], field="use_effective_conv2d")
        for role in FACTORS + (("hada_t1", "hada_t2") if effective else ()):
            report.zero(module, role, roles[role])
