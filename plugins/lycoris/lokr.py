"""LoKr (PEFT ``LOKR``): the delta is the Kronecker product of two factors, each full or low-rank, scaled by
alpha / r.

Written as a third-party plugin would be (public ``adaptools`` API and the shared PEFT plugin helpers);
``docs/methods.md`` (LoKr) has the tensors, config and merge order. With ``out = a·b`` and ``in = c·d``
split by :func:`factorization`:

==========================  ===========================  ==========================================
role                        shape                        when
==========================  ===========================  ==========================================
lokr_w1                     [a, c]                       full left factor (the usual case)
lokr_w1_a, lokr_w1_b        [a, r], [r, c]               ``decompose_both`` and r < max(a, c) / 2
lokr_w2                     [b, d] (conv: [b, d, k…])    r ≥ max(b, d) / 2
lokr_w2_a, lokr_w2_b        [b, r], [r, d] ([r, d·k…])   otherwise
lokr_t2 (+ w2_a, w2_b)      [r, r, kh, kw]; [r, b], [r, d]  conv with ``use_effective_conv2d``
==========================  ===========================  ==========================================

Full factors carry no rank, so the scaling's r comes from the config (``r`` / ``rank_pattern``) alone.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..peft.config_schema import FLAG, MAX_RANK
from ..peft.lint import CORRUPT, FOREIGN_CONFIG, Lint, Rule, rule_table
from .base import Lycoris, config_rank

ROLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

TABLE = rule_table("LOKR", {
    1: "type", 2: "role", 3: "dtype",
    4: Rule("error", "a factor is missing, or saved both full and decomposed",
            "the adapter file is incomplete or mixed up: save it again"),
    5: Rule("error", "factor shapes disagree", CORRUPT),
    6: Rule("error", "ranks or the full/decomposed choice disagree with r / rank_pattern",
            "the config does not belong to these weights (r sets the scaling): ship the matching "
            "adapter_config.json"),
    7: Rule("error", "factor sizes disagree with decompose_factor", FOREIGN_CONFIG),
    8: "target", 9: "values", 10: "zero", 11: "missing", 12: "fit", 13: "inert",
}, method="LoKr", config="LoKrConfig", zero="a factor is all zero: the module changes nothing")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """How LyCORIS (and PEFT) split a dimension into two factors.

    A positive ``factor`` that divides the dimension is used as the first part as is. Otherwise divisors are
    tried upwards while the first part stays below the second and at most ``factor`` (-1: no limit); the
    last pair reached is returned smaller part first (128 -> (8, 16), 64 -> (8, 8), 127 -> (1, 127)).
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        candidate = m + 1
        while dimension % candidate:
            candidate += 1
        if candidate > limit:  # (peft's other stop, a growing sum of the parts, can never trigger)
            break
        m, n = candidate, dimension // candidate
    return (n, m) if m > n else (m, n)


def _kron_shape(left: tuple[int, ...], right: tuple[int, ...]) -> tuple[int, ...]:
    """The shape ``torch.kron`` gives: the shorter shape padded with leading ones, sizes multiplied."""
    nd = max(len(left), len(right))
    left, right = (1,) * (nd - len(left)) + left, (1,) * (nd - len(right)) + right
    return tuple(x * y for x, y in zip(left, right))


class LoKr(Lycoris):
    name = "lokr"
    description = "LoKr (PEFT LOKR): Kronecker product of full or low-rank factors; Linear and conv layers"
    roles = ROLES
    peft_types = ("LOKR",)
    peft_roles = {role: role for role in ROLES}
    table = TABLE
    rules = TABLE.rules
    check_only = frozenset({TABLE.ids["inert"]})
    extra_fields = {"decompose_both": FLAG, "rank_dropout_scale": FLAG,
                    "decompose_factor": {"type": "integer", "minimum": -1, "maximum": MAX_RANK}}

    def delta(self, tensors: Mapping[str, torch.Tensor], scaling: float) -> torch.Tensor:
        # peft's LoKrLayer.get_delta_weight and make_kron, step by step
        t = tensors
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = torch.einsum("i j k l, i p, j r -> p r k l", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        return torch.kron(w1, w2.contiguous()) * scaling

    def _parts(self, shapes: Mapping[str, tuple[int, ...]]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """The shapes of w1 and w2 as the delta forms them; None if the tensors do not agree."""
        if "lokr_w1" in shapes:
            w1 = shapes["lokr_w1"]
        elif "lokr_w1_a" in shapes and "lokr_w1_b" in shapes:
            (a, r1), (r2, c) = shapes["lokr_w1_a"], shapes["lokr_w1_b"]
            if r1 != r2:
                return None
            w1 = (a, c)
        else:
            return None
        if "lokr_w2" in shapes:
            w2 = shapes["lokr_w2"]
        elif "lokr_w2_a" in shapes and "lokr_w2_b" in shapes:
            wa, wb = shapes["lokr_w2_a"], shapes["lokr_w2_b"]
            if len(wa) != 2 or len(wb) != 2:
                return None
            if "lokr_t2" in shapes:
                t2 = shapes["lokr_t2"]
                if len(t2) != 4 or t2[:2] != (wa[0], wb[0]):
                    return None
                w2 = (wa[1], wb[1], *t2[2:])
            elif wa[1] != wb[0]:
                return None
            else:
                w2 = (wa[0], wb[1])
        else:
            return None
        if len(w1) != 2:
            return None
        return w1, w2

    def delta_shape(self, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...] | None:
        parts = self._parts(shapes)
        if parts is None:
            return None
        w1, w2 = parts
        return _kron_shape(w1 + (1, 1) if len(w2) == 4 else w1, w2)

    def factors(self, tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """kron(P1 Q1, P2 Q2) = kron(P1, P2) kron(Q1, Q2); a full factor is written as itself times the smaller
        identity. Exact, of rank rank(w1)·rank(w2)."""

        def split(full: str, left: str, right: str) -> tuple[torch.Tensor, torch.Tensor]:
            if full not in tensors:
                return tensors[left], tensors[right]
            w = tensors[full]
            eye = torch.eye(min(w.shape), dtype=w.dtype)
            return (eye, w) if w.shape[0] <= w.shape[1] else (w, eye)

        p1, q1 = split("lokr_w1", "lokr_w1_a", "lokr_w1_b")
        p2, q2 = split("lokr_w2", "lokr_w2_a", "lokr_w2_b")
        return torch.kron(p1, p2), torch.kron(q1, q2)

    def layer_refusal(self, roles: Mapping[str, str], weight_shape: tuple[int, ...]) -> str | None:
        if "lokr_t2" in roles and len(weight_shape) == 3:
            return ("the effective form (lokr_t2) on a Conv1d layer fails inside peft 0.21.2 itself (torch.kron of "
                    "its [b, d, k, 1] factor), so no reference exists to merge it exactly")
        return None

    def lint_module(self, report: Lint, module: str, roles: dict[str, str], base_shape: tuple[int, ...] | None) -> None:
        adapter, config = report.adapter, report.adapter.config
        anchor = self.anchor(module, roles)
        problems = []
        for full, pair in (("lokr_w1", ("lokr_w1_a", "lokr_w1_b")), ("lokr_w2", ("lokr_w2_a", "lokr_w2_b"))):
            have = [r for r in pair if r in roles]
            if full in roles and have:
                problems.append(f"{full} and {', '.join(have)} are both saved")
            elif full not in roles and len(have) != 2:
                problems.append(f"neither {full} nor both of {', '.join(pair)}")
        if "lokr_t2" in roles and "lokr_w2" in roles:
            problems.append("lokr_t2 goes with lokr_w2_a/lokr_w2_b, not lokr_w2")
        if problems:
            report.add("LOKR004", f"module {module}: {'; '.join(problems)}", anchor)
            return
        shapes = self._shapes(adapter, roles)
        parts = self._parts(shapes)
        if parts is None:
            listed = ", ".join(f"{r} {list(s)}" for r, s in shapes.items())
            report.add("LOKR005", f"factor shapes disagree: {listed}", anchor)
            return
        self._lint_ranks(report, module, roles, shapes, parts, base_shape)
        for role in ROLES:
            if role in roles:
                report.zero(module, role, roles[role])
        if "lokr_t2" in roles and not config.get("use_effective_conv2d"):
            report.add("LOKR006", "lokr_t2 is saved but use_effective_conv2d is false", roles["lokr_t2"],
                       field="use_effective_conv2d")

    def _lint_ranks(self, report: Lint, module: str, roles: dict[str, str], shapes: dict[str, tuple[int, ...]],
                    parts: tuple[tuple[int, ...], tuple[int, ...]], base_shape: tuple[int, ...] | None) -> None:
        """Decomposed factors have the config's rank; on a Linear layer, which factors are full and how the
        dimensions are split follow from r, decompose_both and decompose_factor as PEFT decides them.

        Two-dimensional factors alone do not say Linear: a conv's low-rank right factor is flattened too
        (``[r, d·kh·kw]``). Without a base, only a full 2-D right factor proves a Linear layer."""
        config = report.adapter.config
        rank = config_rank(config, module)
        if rank is None:
            return
        anchor = self.anchor(module, roles)
        for role in ("lokr_w1_b", "lokr_w2_b"):
            if role in shapes and shapes[role][0] != rank:
                report.add("LOKR006", f"config gives rank {rank} (r / rank_pattern) but {role} has rank "
                           f"{shapes[role][0]}", roles[role], field="r")
                return
        (a, c), w2 = parts
        linear = len(base_shape) == 2 if base_shape is not None else len(shapes.get("lokr_w2", ())) == 2
        if not linear or len(w2) != 2:
            return
        b, d = w2
        if base_shape is not None and base_shape != (a * b, c * d):
            return  # the delta does not fit the base at all: that rule says it
        factor = config.get("decompose_factor", -1)
        if isinstance(factor, int) and (factorization(a * b, factor), factorization(c * d, factor)) != ((a, b), (c, d)):
            report.add("LOKR007", f"factors split [{a * b}, {c * d}] as [{a}·{b}, {c}·{d}], but decompose_factor "
                       f"{factor} splits it as {factorization(a * b, factor)} x {factorization(c * d, factor)}",
                       anchor, field="decompose_factor")
            return
        full_w1 = not (config.get("decompose_both") and rank < max(a, c) / 2)
        full_w2 = not rank < max(b, d) / 2
        for name, expected, saved in (("w1", full_w1, "lokr_w1" in roles), ("w2", full_w2, "lokr_w2" in roles)):
            if expected != saved:
                report.add("LOKR006", f"with r = {rank} PEFT makes {name} {'full' if expected else 'low-rank'}, but "
                           f"the file holds it {'full' if saved else 'low-rank'} (r sets the scaling alpha / r)",
                           anchor, field="r")
                return
