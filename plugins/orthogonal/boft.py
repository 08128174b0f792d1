"""BOFT (PEFT ``BOFT``): a product of butterfly-permuted block-diagonal orthogonal matrices multiplies the
weight on its input side, and a vector scales its output rows: ``W' = (M Wᵀ)ᵀ ⊙ s``.

Written as a third-party plugin would be (public ``adaptools`` API and the shared PEFT plugin helpers);
``docs/methods.md`` (BOFT) has the tensors, config and the exact order of operations.

==========  ==============  ==================================================================
role        shape           PEFT key suffix
==========  ==============  ==================================================================
boft_R      [N, D, H, H]    ``boft_R``: N butterfly factors of D unconstrained H×H blocks
boft_s      [out, 1]        ``boft_s``: output row scale
==========  ==============  ==================================================================

PEFT builds more than one butterfly factor only with its CUDA kernel; without it (any CPU) it trains and
loads N = 1 whatever ``boft_n_butterfly_factor`` says, so N is read from the tensor. Factors N > 1 (saved
on a GPU) are merged here in pure torch: the kernel only assembles block-diagonal matrices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from adaptools.plugin import Adapter, BaseInfo, Finding

from ..peft.config_schema import MAX_BUTTERFLY_FACTORS, SIZE, config_schema
from ..peft.lint import CORRUPT, FOREIGN_CONFIG, INCOMPLETE, Lint, Rule, rule_table
from .base import Orthogonal, block_diagonal, exactly_one

ROLES = ("boft_R", "boft_s")

TABLE = rule_table("BOFT", {
    1: "type", 2: "role", 3: "dtype",
    4: Rule("error", "boft_R without boft_s (or the reverse)", INCOMPLETE),
    5: Rule("error", "boft_R is not [factors, blocks, b, b] or boft_s is not [out, 1]", CORRUPT),
    6: Rule("error", "exactly one of boft_block_size and boft_block_num must be set",
            "set boft_block_size or boft_block_num to 0 (the one that was not used in training)"),
    7: Rule("error", "factors, block count or block size disagree with the config", FOREIGN_CONFIG),
    8: "target", 9: "values", 10: "zero", 11: "missing", 12: "fit", 13: "inert",
}, method="BOFT", config="BOFTConfig", zero="boft_R is zero and boft_s is one: the module changes nothing")
#: The BOFTConfig fields adaptools reads, their types and ranges.
CONFIG_SCHEMA = config_schema({
    "boft_block_size": SIZE, "boft_block_num": SIZE,
    "boft_n_butterfly_factor": {"type": "integer", "minimum": 0, "maximum": MAX_BUTTERFLY_FACTORS,
                                "description": f"an integer from 0 to {MAX_BUTTERFLY_FACTORS}"}})


def butterfly_permutation(n: int, blocks: int, half: int, extra_factors: int) -> torch.Tensor:
    """PEFT's block butterfly permutation of ``n`` indices (the identity when there is one factor only).

    The indices are cut into ``blocks`` chunks; within each, groups of ``half`` indices are reordered so that
    the even-numbered groups come first, then the odd-numbered ones.
    """
    if extra_factors == 0:
        return torch.arange(n)
    if blocks * half * 2 > n:
        raise ValueError("invalid number of blocks")
    size = int(n // blocks)
    step = size / half
    positions = torch.cat((torch.arange(0, step, 2), torch.arange(1, step, 2)), dim=0)
    order = torch.empty(size, dtype=torch.long)
    initial = torch.arange(size)
    for i, pos in enumerate(positions):
        order[int(i * half): int(i * half + half)] = initial[int(pos * half): int(pos * half + half)]
    indices = torch.arange(n)
    for start in range(0, n, size):
        indices[start:start + size] = indices[start:start + size][order]
    return indices


def permutation_matrix(indices: torch.Tensor) -> torch.Tensor:
    """``P[i, indices[i]] = 1`` in fp32."""
    n = len(indices)
    matrix = torch.zeros((n, n))
    matrix[torch.arange(n), indices] = 1
    return matrix


def butterfly_matrix(boft_r: torch.Tensor) -> torch.Tensor:
    """``M = M_{N-1} … M_0`` with ``M_i = P_i · block_diag(Cayley(R_i)) · P_iᵀ``, as PEFT's get_delta_weight."""
    n_factors, blocks, size, _ = boft_r.shape
    data = boft_r.reshape(n_factors * blocks, size, size)
    skew_part = 0.5 * (data - data.transpose(1, 2))
    eye = torch.eye(size).unsqueeze(0).expand(n_factors * blocks, size, size)
    rotations = torch.linalg.solve(eye + skew_part, eye - skew_part, left=False).to(data.dtype)
    rotations = rotations.view(n_factors, blocks, size, size)
    diagonal = torch.stack([block_diagonal(torch.unbind(rotations[i])) for i in range(n_factors)])
    in_features = blocks * size
    perms = torch.empty((n_factors, in_features, in_features))
    for i in range(n_factors):
        perms[i] = permutation_matrix(butterfly_permutation(in_features, int(blocks / (2 ** i)), int(size / 2),
                                                            n_factors - 1))
    perms = perms.to(diagonal.dtype)
    batch = torch.bmm(diagonal, perms.permute(0, 2, 1))
    batch = torch.bmm(perms, batch)
    matrix = batch[0]
    for i in range(1, n_factors):
        matrix = batch[i] @ matrix
    return matrix


class BOFT(Orthogonal):
    name = "boft"
    description = "BOFT (PEFT BOFT): butterfly products of orthogonal blocks with an output scale; Linear"
    roles = ROLES
    peft_types = ("BOFT",)
    peft_roles = {"boft_R": "boft_R", "boft_s": "boft_s"}
    rules = TABLE.rules
    check_only = frozenset({TABLE.ids["inert"]})
    conditional = {"merge": "Linear layers at weight 1 (conv and embedding layers and weighted merges are refused, "
                            "naming why)",
                   "apply": "Linear layers (conv and embedding layers are refused, naming why)"}
    marker = "boft_R"
    markers = ("boft_R",)

    def rotation(self, adapter: Adapter, module: str, roles: Mapping[str, str], in_features: int) -> torch.Tensor:
        return butterfly_matrix(adapter.tensor(roles["boft_R"]).float())

    def input_rotation(self, adapter: Adapter, module: str, roles: Mapping[str, str], in_features: int) -> Any:
        # PEFT's forward accumulates the rotation onto an identity: M @ I, then x @ (M @ I)
        matrix = self.rotation(adapter, module, roles, in_features) @ torch.eye(in_features)
        return lambda x: x @ matrix

    def scale(self, adapter: Adapter, roles: Mapping[str, str]) -> torch.Tensor | None:
        return adapter.tensor(roles["boft_s"]).float()

    # --- check ---------------------------------------------------------------------------------------------

    def lint(self, adapter: Adapter, base: BaseInfo | None = None, *, check_values: bool = True) -> list[Finding]:
        report = Lint(adapter, TABLE)
        if not report.config(CONFIG_SCHEMA):
            return report.unusable_config(ROLES, check_values)
        valid = exactly_one(report, "BOFT006", ("boft_block_size", 4), ("boft_block_num", 0))
        report.roles(ROLES)
        for module, roles in adapter.modules().items():
            present = [r for r in ROLES if r in roles]
            if not present:
                continue
            if len(present) == 1:
                report.add("BOFT004", f"module {module} has {present[0]} only", roles[present[0]])
                continue
            r_shape, s_shape = (tuple(adapter.info(roles[r]).shape) for r in ROLES)
            if len(r_shape) != 4 or r_shape[2] != r_shape[3] or len(s_shape) != 2 or s_shape[1] != 1:
                report.add("BOFT005", f"boft_R {list(r_shape)}, boft_s {list(s_shape)}", roles["boft_R"])
                continue
            if valid:
                self._lint_blocks(report, roles, r_shape)
            report.targeted(module, roles["boft_R"])
            if base is not None:
                found = report.base_tensor(base, module, roles["boft_R"])
                if found is not None and len(found.shape) == 2 and \
                        (found.shape[1] != r_shape[1] * r_shape[2] or found.shape[0] != s_shape[0]):
                    report.add("BOFT012", f"boft_R {list(r_shape)} and boft_s {list(s_shape)} do not fit base "
                               f"{found.name} {list(found.shape)}", roles["boft_R"])
        if check_values:
            report.finite()
            for module, roles in adapter.modules().items():
                if all(r in roles for r in ROLES):
                    r, s = adapter.tensor(roles["boft_R"]), adapter.tensor(roles["boft_s"])
                    if r.numel() and not bool(r.any()) and bool((s == 1).all()):
                        report.add("BOFT010", f"{module} is the identity", roles["boft_R"])
                        report.inert.add(module)
            report.no_effect({m for m, roles in adapter.modules().items() if all(r in roles for r in ROLES)})
        return report.findings

    def _lint_blocks(self, report: Lint, roles: Mapping[str, str], shape: tuple[int, ...]) -> None:
        """The blocks PEFT builds from the config for ``in = D·H`` inputs, and factors PEFT could have made:
        1 (every CPU run), or boft_n_butterfly_factor with the CUDA kernel, whose permutations need even,
        halvable block counts."""
        config = report.adapter.config
        n_factors, blocks, size, _ = shape
        in_features = blocks * size
        wanted_size = config.get("boft_block_size") or 0
        wanted_num = config.get("boft_block_num") or 0
        if (wanted_size and wanted_size != size) or (wanted_num and wanted_num != blocks):
            field = "boft_block_size" if wanted_size else "boft_block_num"
            asked = f"blocks of {wanted_size}" if wanted_size else f"{wanted_num} blocks"
            report.add("BOFT007", f"the config asks for {asked} but boft_R holds {blocks} blocks of {size} "
                       f"({in_features} inputs)", roles["boft_R"], field=field)
            return
        factor = config.get("boft_n_butterfly_factor", 1)
        if isinstance(factor, int) and n_factors not in (1, factor):
            report.add("BOFT007", f"boft_R holds {n_factors} butterfly factors; the config says {factor} (and "
                       "without PEFT's CUDA kernel it is 1)", roles["boft_R"], field="boft_n_butterfly_factor")
        elif n_factors > 1 and (blocks % (2 ** (n_factors - 1)) or size % 2 or blocks % 2
                                or n_factors - 1 > int(math.log2(blocks))):
            report.add("BOFT007", f"{n_factors} butterfly factors cannot permute {blocks} blocks of {size}",
                       roles["boft_R"], field="boft_n_butterfly_factor")

    def summary(self, adapter: Adapter) -> dict[str, Any]:
        config = adapter.config
        shapes = {tuple(adapter.info(roles["boft_R"]).shape) for roles in adapter.modules().values()
                  if "boft_R" in roles}
        return {"boft_block_size": config.get("boft_block_size"), "boft_block_num": config.get("boft_block_num"),
                "butterfly_factors": sorted({s[0] for s in shapes}),
                "config_butterfly_factor": config.get("boft_n_butterfly_factor"),
                "target_modules": config.get("target_modules"),
                "adapted_modules": sum("boft_R" in roles for roles in adapter.modules().values())}
