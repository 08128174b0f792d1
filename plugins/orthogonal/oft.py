"""OFT (PEFT ``OFT``): a block-diagonal orthogonal matrix, from skew-symmetric blocks by the Cayley
transform, multiplies the weight on its input side: ``W' = W Rᵀ``.

Written as a third-party plugin would be (public ``adaptools`` API and the shared PEFT plugin helpers);
``docs/methods.md`` (OFT) has the tensors, config and the exact order of operations.

==================  ====================  ================================================
role                shape                 PEFT key suffix
==================  ====================  ================================================
oft_R               [k, b(b-1)/2]         ``oft_R.weight``: each block's strict upper triangle
==================  ====================  ================================================

``k`` is the number of blocks (``in / b``), or 1 with ``block_share``. Checkpoints of peft <= 0.15 (``oft_r``,
``oft_s``) are a different parametrisation that current peft refuses to load; so do we, naming why.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from adaptools.plugin import Adapter, BaseInfo, Finding

from ..peft.config_schema import FLAG, MAX_ALPHA, MAX_SERIES_TERMS, SIZE, config_schema
from ..peft.lint import CORRUPT, FOREIGN_CONFIG, Lint, Rule, rule_table
from .base import Orthogonal, block_diagonal, exactly_one

ROLES = ("oft_R", "oft_embedding_R", "oft_r", "oft_s")
LEGACY = ("oft_r", "oft_s")

TABLE = rule_table("OFT", {
    1: "type", 2: "role", 3: "dtype",
    4: Rule("error", "oft_R is not [blocks, b(b-1)/2] for any block size b", CORRUPT),
    5: Rule("error", "exactly one of r and oft_block_size must be set",
            "set r or oft_block_size to 0 (the one that was not used in training)"),
    6: Rule("error", "block count or size disagrees with r / oft_block_size / block_share", FOREIGN_CONFIG),
    7: "target", 8: "values", 9: "zero", 10: "missing", 11: "fit",
    12: Rule("error", "checkpoint of peft <= 0.15 (oft_r/oft_s): no longer loadable",
             "load it with peft <= 0.15.2 and retrain, or use that version to merge it"),
    13: "inert",
}, method="OFT", config="OFTConfig", zero="oft_R is all zero: the rotation is the identity")
#: The OFTConfig fields adaptools reads, their types and ranges (the Neumann series is bounded: each term
#: is a product of blocks).
CONFIG_SCHEMA = config_schema({
    "r": SIZE, "oft_block_size": SIZE, "block_share": FLAG, "coft": FLAG, "use_cayley_neumann": FLAG,
    "eps": {"type": "number", "minimum": 0, "maximum": MAX_ALPHA, "description": "a non-negative number"},
    "num_cayley_neumann_terms": {"type": "integer", "minimum": 0, "maximum": MAX_SERIES_TERMS,
                                 "description": f"an integer from 0 to {MAX_SERIES_TERMS}"}})


def block_size_of(width: int) -> int | None:
    """The block size b with ``b(b-1)/2 == width`` (None if there is none)."""
    b = (1 + math.isqrt(1 + 8 * width)) // 2
    return b if b * (b - 1) // 2 == width and b >= 2 else None


def adjust(in_features: int, wanted: int) -> int:
    """PEFT's replacement for an r or block size that does not divide the input size: the divisor of
    ``in_features`` nearest to ``wanted``, the lower one on a tie (``wanted`` above it: ``in_features``)."""
    if wanted >= in_features:
        return in_features
    higher = wanted
    while higher <= in_features and in_features % higher:
        higher += 1
    lower = wanted
    while lower > 1 and in_features % lower:
        lower -= 1
    return lower if wanted - lower <= higher - wanted else higher


def expected_blocks(config: Mapping[str, Any], in_features: int) -> tuple[int, int]:
    """(number of blocks, block size) PEFT builds for a layer with ``in_features`` inputs."""
    r, size = int(config.get("r", 0) or 0), int(config.get("oft_block_size", 0) or 0)
    if size:
        if in_features % size or size > in_features:
            size = adjust(in_features, size)
        return in_features // size, size
    if in_features % r or r > in_features:
        r = adjust(in_features, r)
    return r, in_features // r


def skew(vec: torch.Tensor, b: int) -> torch.Tensor:
    """Skew-symmetric ``[k, b, b]`` blocks from their strict upper triangles (``triu_indices`` order)."""
    rows, cols = torch.triu_indices(b, b, 1)
    matrix = torch.zeros(vec.shape[0], b, b, dtype=vec.dtype)
    matrix[:, rows, cols] = vec
    return matrix - matrix.transpose(-2, -1)


def project(vec: torch.Tensor, b: int, eps: float) -> torch.Tensor:
    """COFT's constraint: each block whose Frobenius norm exceeds ``eps / √blocks`` is scaled down to it."""
    q = skew(vec, b)
    limit = eps * 1 / torch.sqrt(torch.tensor(q.shape[0]))
    zero = torch.zeros((b, b), dtype=q.dtype).unsqueeze(0).expand_as(q)
    norm = torch.norm(q - zero, dim=(1, 2), keepdim=True)
    out = torch.where(norm <= limit, q, zero + limit * ((q - zero) / norm))
    rows, cols = torch.triu_indices(b, b, 1)
    return out[:, rows, cols]


def cayley(vec: torch.Tensor, b: int, neumann: bool, terms: int) -> torch.Tensor:
    """``[k, b, b]`` rotations: ``(I - Q)(I + Q)⁻¹`` solved exactly, or PEFT's truncated series
    ``I + 2Q + 2Q² + … + 2Q^(T-2) + Q^(T-1)`` (the last term has coefficient 1), summed in PEFT's order."""
    q = skew(vec, b)
    k = vec.shape[0]
    if not neumann:
        eye = torch.eye(b).unsqueeze(0).expand(k, b, b)
        solved: torch.Tensor = torch.linalg.solve(eye + q, eye - q, left=False)
        return solved.to(vec.dtype)
    r = torch.eye(b, dtype=vec.dtype).repeat(k, 1, 1)
    if terms > 1:
        r.add_(q, alpha=2.0)
        if terms > 2:
            power = torch.bmm(q, q)
            r.add_(power, alpha=2.0)
            for _ in range(3, terms - 1):
                power = torch.bmm(power, q)
                r.add_(power, alpha=2.0)
            power = torch.bmm(power, q)
            r.add_(power)
    return r


class OFT(Orthogonal):
    name = "oft"
    description = "OFT (PEFT OFT): block-diagonal Cayley rotations of the input side; COFT, shared blocks"
    roles = ROLES
    peft_types = ("OFT",)
    peft_roles = {"oft_R.weight": "oft_R", "oft_embedding_R.weight": "oft_embedding_R", "oft_r": "oft_r",
                  "oft_s": "oft_s"}
    rules = TABLE.rules
    check_only = frozenset({TABLE.ids["inert"]})
    conditional = {"merge": "Linear layers at weight 1 (conv and embedding layers and weighted merges are refused, "
                            "naming why)",
                   "apply": "Linear layers (conv and embedding layers are refused, naming why)"}
    marker = "oft_R"
    markers = ("oft_R", "oft_embedding_R")

    def blocks(self, adapter: Adapter, module: str, roles: Mapping[str, str]) -> torch.Tensor:
        """The module's rotation blocks ``[k, b, b]`` (after COFT's projection), in fp32."""
        config = adapter.config
        vec = adapter.tensor(roles["oft_R"]).float()
        b = block_size_of(vec.shape[1])
        assert b is not None  # checked by lint (OFT004) before any merge
        if config.get("coft"):
            vec = project(vec, b, float(config.get("eps", 6e-5)))
        return cayley(vec, b, bool(config.get("use_cayley_neumann", True)),
                      int(config.get("num_cayley_neumann_terms", 5)))

    def rotation(self, adapter: Adapter, module: str, roles: Mapping[str, str], in_features: int) -> torch.Tensor:
        blocks = self.blocks(adapter, module, roles)
        count = in_features // blocks.shape[1] if adapter.config.get("block_share") else blocks.shape[0]
        return block_diagonal([blocks[0 if blocks.shape[0] == 1 else i] for i in range(count)])

    def input_rotation(self, adapter: Adapter, module: str, roles: Mapping[str, str], in_features: int) -> Any:
        """PEFT's forward rotates block by block: ``einsum("...rk,rkc->...rc")`` on ``[..., blocks, b]``."""
        blocks = self.blocks(adapter, module, roles)
        count = in_features // blocks.shape[1]
        if adapter.config.get("block_share"):
            blocks = blocks.repeat(count, 1, 1)

        def rotate(x: torch.Tensor) -> torch.Tensor:
            shaped = x.reshape(*x.shape[:-1], count, blocks.shape[1])
            return torch.einsum("...rk,rkc->...rc", shaped, blocks).reshape(x.shape)

        return rotate

    def module_refusal(self, adapter: Adapter, roles: Mapping[str, str]) -> str | None:
        if "oft_embedding_R" in roles:
            return "OFT on embedding layers is not supported yet"
        return None

    # --- check ---------------------------------------------------------------------------------------------

    def lint(self, adapter: Adapter, base: BaseInfo | None = None, *, check_values: bool = True) -> list[Finding]:
        report = Lint(adapter, TABLE)
        if not report.config(CONFIG_SCHEMA):
            return report.unusable_config(ROLES, check_values)
        valid = exactly_one(report, "OFT005", ("r", 0), ("oft_block_size", 0))
        report.roles(ROLES)
        for module, roles in adapter.modules().items():
            legacy = [r for r in LEGACY if r in roles]
            if legacy:
                report.add("OFT012", f"{module} holds {', '.join(legacy)}: OFT as peft <= 0.15 saved it",
                           roles[legacy[0]])
                continue
            if "oft_R" not in roles:
                continue
            shape = adapter.info(roles["oft_R"]).shape
            b = block_size_of(shape[1]) if len(shape) == 2 else None
            if b is None:
                report.add("OFT004", f"oft_R is {list(shape)}", roles["oft_R"])
                continue
            if valid:
                self._lint_blocks(report, module, roles, shape[0], b, None)
            report.targeted(module, roles["oft_R"])
            if base is not None:
                found = report.base_tensor(base, module, roles["oft_R"])
                if found is not None:
                    self._lint_base(report, module, roles, shape[0], b, tuple(found.shape), valid)
        if check_values:
            report.finite()
            report.zeros("oft_R")
            report.no_effect({m for m, roles in adapter.modules().items() if "oft_R" in roles})
        return report.findings

    def _lint_blocks(self, report: Lint, module: str, roles: Mapping[str, str], rows: int, b: int,
                     in_features: int | None) -> None:
        """Blocks as PEFT would have built them: shared -> one row; otherwise (k, b) from r or oft_block_size
        for ``in_features`` (``k·b`` when the base is not known)."""
        config = report.adapter.config
        shared = bool(config.get("block_share"))
        if shared and rows != 1:
            report.add("OFT006", f"block_share is true but oft_R has {rows} blocks", roles["oft_R"],
                       field="block_share")
            return
        if not shared and in_features is None:
            in_features = rows * b
        if in_features is None:
            return
        want = expected_blocks(config, in_features)
        if (1 if shared else want[0], want[1]) != (rows, b):
            field = "oft_block_size" if config.get("oft_block_size") else "r"
            report.add("OFT006", f"for {in_features} inputs the config gives {want[0]} blocks of {want[1]}, but "
                       f"oft_R holds {rows} of {b}{' (shared)' if shared else ''}", roles["oft_R"], field=field)

    def _lint_base(self, report: Lint, module: str, roles: Mapping[str, str], rows: int, b: int,
                   shape: tuple[int, ...], valid: bool) -> None:
        if len(shape) != 2:
            return  # conv layers: refused when merged or applied, with the reason
        in_features = shape[1]
        shared = bool(report.adapter.config.get("block_share"))
        if in_features % b or (not shared and rows * b != in_features):
            report.add("OFT011", f"oft_R holds {rows} block(s) of {b}; {module} has {in_features} inputs",
                       roles["oft_R"])
        elif valid and shared:
            self._lint_blocks(report, module, roles, rows, b, in_features)

    def summary(self, adapter: Adapter) -> dict[str, Any]:
        config = adapter.config
        sizes = sorted({block_size_of(adapter.info(roles["oft_R"]).shape[1]) or 0
                        for roles in adapter.modules().values() if "oft_R" in roles})
        return {"block_size": sizes[0] if len(sizes) == 1 else sizes, "r": config.get("r"),
                "block_share": bool(config.get("block_share")), "coft": bool(config.get("coft")),
                "eps": config.get("eps") if config.get("coft") else None,
                "cayley": "neumann" if config.get("use_cayley_neumann", True) else "exact",
                "neumann_terms": config.get("num_cayley_neumann_terms", 5)
                if config.get("use_cayley_neumann", True) else None,
                "target_modules": config.get("target_modules"),
                "adapted_modules": sum("oft_R" in roles for roles in adapter.modules().values())}
