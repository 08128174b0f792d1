"""VeRA (PEFT ``VERA``): one pair of frozen random projections shared by every layer, and two trained
scaling vectors per layer: ``delta = (λ_b ⊙ B[:out]) @ (λ_d ⊙ A[:, :in])``.

Written as a third-party plugin would be (public ``adaptools`` API and the shared PEFT plugin helpers);
``docs/methods.md`` (VeRA) has the tensors, the regeneration of the projections and the merge order.

================  ==============  ===================================================
role              shape           PEFT key
================  ==============  ===================================================
vera_lambda_b     [out]           ``base_model.model.<module>.vera_lambda_b``
vera_lambda_d     [r]             ``base_model.model.<module>.vera_lambda_d``
vera_A            [r, in_max]     ``base_model.vera_A`` (model level; absent when
vera_B            [out_max, r]    ``base_model.vera_B``  ``save_projection`` is false)
================  ==============  ===================================================

Without saved projections, A and B are regenerated exactly as PEFT draws them from
``projection_prng_key``; their size is the largest (out, in) over the adapted layers, which needs the base.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from adaptools.plugin import Adapter, BaseInfo, Finding, IncompatibleBaseError, InputError

from ..peft.additive import AdditiveDelta, Delta, Path
from ..peft.common import find_module, locate, weight_layout, weight_of
from ..peft.config_schema import ALPHA, FLAG, RANK, SEED, config_schema
from ..peft.lint import FOREIGN_CONFIG, INCOMPLETE, Lint, Rule, rule_table

LAMBDAS = ("vera_lambda_b", "vera_lambda_d")
PROJECTIONS = ("vera_A", "vera_B")
ROLES = LAMBDAS + PROJECTIONS

TABLE = rule_table("VERA", {
    1: "type", 2: "role", 3: "dtype",
    4: Rule("error", "vera_lambda_b without vera_lambda_d (or the reverse)", INCOMPLETE),
    5: Rule("error", "vera_lambda_d's length differs from r", FOREIGN_CONFIG),
    6: Rule("error", "saved projections and save_projection disagree",
            "save the adapter again with peft (or set save_projection to match the file)"),
    7: Rule("error", "projections have the wrong rank or are too small for a layer",
            "the adapter file is corrupt or mixed with another adapter's projections: save it again"),
    8: "target", 9: "values", 10: "zero", 11: "missing", 12: "fit", 13: "inert",
}, method="VeRA", config="VeraConfig", zero="vera_lambda_b is all zero: the module changes nothing")
#: Safetensors dtype codes of 16-bit float weights.
STORED_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16}
#: The VeraConfig fields adaptools reads, their types and ranges.
CONFIG_SCHEMA = config_schema({"r": RANK, "projection_prng_key": SEED, "save_projection": FLAG, "d_initial": ALPHA})


def layer_dims(weight_shape: tuple[int, ...], out_features: int, fan_in_fan_out: bool) -> tuple[str, int] | None:
    """(layout, in_features) of a layer whose output size is ``out_features`` (λ_b's length); None if the
    weight has no such side."""
    layout = weight_layout(weight_shape, out_features, None, fan_in_fan_out)
    if layout is None:
        return None
    return layout, int(weight_shape[0] if layout == "fan_in_fan_out" else weight_shape[1])


def regenerate(key: int, rank: int, out_max: int, in_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's projections for ``projection_prng_key``: one CPU generator seeded with the key draws A
    ``[r, in_max]`` and then B ``[out_max, r]``, each uniform in ±√3·√2/√fan_in (fan_in: the second size)."""
    generator = torch.Generator(device="cpu").manual_seed(key)

    def kaiming(shape: tuple[int, int]) -> torch.Tensor:
        bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
        return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)

    a = kaiming((rank, in_max))
    return a, kaiming((out_max, rank))


class Shared(NamedTuple):
    """What every module of a merge or application uses: the projections (fp32) and per module
    ``(layout, in, out)``."""

    a: torch.Tensor
    b: torch.Tensor
    dims: dict[str, tuple[str, int, int]]


class VeRA(AdditiveDelta):
    name = "vera"
    description = "VeRA (PEFT VERA): shared random projections, per-layer scaling vectors; saved or regenerated"
    roles = ROLES
    peft_types = ("VERA",)
    peft_roles = {"vera_lambda_b": "vera_lambda_b", "vera_lambda_d": "vera_lambda_d",
                  "base_model.vera_A": "vera_A", "base_model.vera_B": "vera_B"}
    rules = TABLE.rules
    check_only = frozenset({TABLE.ids["inert"]})
    unsupported = {"algebra": "a VeRA delta needs each layer's input size, which only the base knows; diff "
                              "compares its tensors"}

    # --- check ------------------------------------------------------------------------------------------

    def lint(self, adapter: Adapter, base: BaseInfo | None = None, *, check_values: bool = True) -> list[Finding]:
        report = Lint(adapter, TABLE)
        if not report.config(CONFIG_SCHEMA):
            return report.unusable_config(ROLES, check_values)
        report.roles(ROLES)
        config = adapter.config
        rank = config.get("r", 256)
        rank = rank if isinstance(rank, int) and not isinstance(rank, bool) else None
        shared = adapter.modules().get("", {})
        saved = [r for r in PROJECTIONS if r in shared]
        save_projection = config.get("save_projection", True)
        if isinstance(save_projection, bool) and (len(saved) == 2) != save_projection:
            report.add("VERA006", f"save_projection is {str(save_projection).lower()} but the file holds "
                       f"{', '.join(saved) or 'no projections'}", shared.get(saved[0]) if saved else None,
                       field="save_projection")
        elif len(saved) == 2 and rank is not None:
            a, b = (adapter.info(shared[r]).shape for r in PROJECTIONS)
            if len(a) != 2 or len(b) != 2 or a[0] != rank or b[1] != rank:
                report.add("VERA007", f"vera_A {list(a)} and vera_B {list(b)} are not of rank r = {rank}",
                           shared["vera_A"])
        for module, roles in adapter.modules().items():
            if module:
                self._lint_module(report, module, roles, rank, shared)
                if base is not None and "vera_lambda_b" in roles:
                    self._lint_base(report, base, module, roles, shared)
        if check_values:
            report.finite()
            report.zeros("vera_lambda_b")
            report.no_effect({m for m, roles in adapter.modules().items() if "vera_lambda_b" in roles})
        return report.findings

    def _lint_module(self, report: Lint, module: str, roles: dict[str, str], rank: int | None,
                     shared: Mapping[str, str]) -> None:
        adapter = report.adapter
        present = [r for r in LAMBDAS if r in roles]
        if not present:
            return
        if len(present) == 1:
            other = LAMBDAS[1] if present[0] == LAMBDAS[0] else LAMBDAS[0]
            report.add("VERA004", f"module {module} has {present[0]} but not {other}", roles[present[0]])
            return
        b, d = (adapter.info(roles[r]).shape for r in LAMBDAS)
        if len(b) != 1 or len(d) != 1:
            report.add("VERA007", f"vera_lambda_b {list(b)} and vera_lambda_d {list(d)} are not vectors",
                       roles["vera_lambda_b"])
            return
        if rank is not None and d[0] != rank:
            report.add("VERA005", f"config gives r = {rank} but vera_lambda_d has {d[0]} entries",
                       roles["vera_lambda_d"], field="r")
        elif "vera_B" in shared and adapter.info(shared["vera_B"]).shape[0] < b[0]:
            report.add("VERA007", f"vera_B has {adapter.info(shared['vera_B']).shape[0]} rows, fewer than "
                       f"{module}'s {b[0]} outputs", roles["vera_lambda_b"])
        report.targeted(module, roles["vera_lambda_b"])

    def _lint_base(self, report: Lint, base: BaseInfo, module: str, roles: dict[str, str],
                   shared: Mapping[str, str]) -> None:
        found = report.base_tensor(base, module, roles["vera_lambda_b"])
        if found is None:
            return
        out = report.adapter.info(roles["vera_lambda_b"]).shape[0]
        dims = layer_dims(tuple(found.shape), out, bool(report.adapter.config.get("fan_in_fan_out")))
        if dims is None:
            report.add("VERA012", f"vera_lambda_b has {out} entries; base {found.name} is {list(found.shape)}",
                       roles["vera_lambda_b"])
        elif "vera_A" in shared and report.adapter.info(shared["vera_A"]).shape[-1] < dims[1]:
            report.add("VERA012", f"vera_A has {report.adapter.info(shared['vera_A']).shape[-1]} columns, fewer "
                       f"than {found.name}'s {dims[1]} inputs", roles["vera_lambda_b"])

    def summary(self, adapter: Adapter) -> dict[str, Any]:
        config = adapter.config
        return {"r": config.get("r"), "save_projection": config.get("save_projection", True),
                "projection_prng_key": config.get("projection_prng_key"),
                "target_modules": config.get("target_modules"),
                "adapted_modules": sum("vera_lambda_b" in roles for m, roles in adapter.modules().items() if m)}

    # --- projections ---------------------------------------------------------------------------------------

    def projections(self, adapter: Adapter, dims: Mapping[str, tuple[str, int, int]],
                    weight_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) in fp32: the saved ones, or regenerated over ``dims`` (module -> (layout, in, out)).

        PEFT moves the regenerated projections to the layers' dtype before it upcasts the adapter, so on a
        bf16 or fp16 base, in training as in loading, they are rounded to that dtype: so are ours."""
        shared = adapter.modules().get("", {})
        if "vera_A" in shared and "vera_B" in shared:
            return adapter.tensor(shared["vera_A"]).float(), adapter.tensor(shared["vera_B"]).float()
        key = adapter.config.get("projection_prng_key", 0)
        if not dims:
            raise InputError("a VeRA adapter without saved projections and without layers", path=adapter.source)
        out_max = max(d[2] for d in dims.values())
        in_max = max(d[1] for d in dims.values())
        a, b = regenerate(int(key), int(adapter.config.get("r", 256)), out_max, in_max)
        if weight_dtype in (torch.bfloat16, torch.float16):
            a, b = a.to(weight_dtype).float(), b.to(weight_dtype).float()
        return a, b

    def _dims(self, adapter: Adapter, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[str, int, int]]:
        """module -> (layout, in, out) for every adapted module, from its weight's shape."""
        fifo = bool(adapter.config.get("fan_in_fan_out"))
        dims = {}
        for module, roles in adapter.modules().items():
            if not module or "vera_lambda_b" not in roles:
                continue
            out = adapter.info(roles["vera_lambda_b"]).shape[0]
            found = layer_dims(shapes[module], out, fifo)
            if found is None:
                raise IncompatibleBaseError(f"vera_lambda_b has {out} entries; the weight of {module} is "
                                            f"{list(shapes[module])}", **adapter.where(roles["vera_lambda_b"]),
                                            hint="the adapter was made for another model size")
            dims[module] = (found[0], found[1], out)
        return dims

    @staticmethod
    def _check_fits(adapter: Adapter, a: torch.Tensor, b: torch.Tensor, module: str, roles: Mapping[str, str],
                    dims: tuple[str, int, int]) -> None:
        if a.shape[1] < dims[1] or b.shape[0] < dims[2]:
            raise IncompatibleBaseError(f"the projections A {list(a.shape)} and B {list(b.shape)} are smaller "
                                        f"than {module} (in {dims[1]}, out {dims[2]})",
                                        **adapter.where(roles["vera_lambda_b"]),
                                        hint="the adapter was made for another model size")

    # --- merge and unmerged forward (the adding: plugins/peft/additive.py) ---------------------------------

    def anchor(self, module: str, roles: Mapping[str, str]) -> str | None:
        return roles.get("vera_lambda_b") if module else None  # module "": the shared projections

    def source(self, roles: Mapping[str, str]) -> str:
        return ", ".join(roles[r] for r in LAMBDAS)

    def prepare_merge(self, adapter: Adapter, base: BaseInfo) -> Shared:
        """The projections, and every module's (layout, in, out) from the base's headers (regenerated
        projections are as large as the largest layer), rounded to the base's 16-bit dtype as PEFT does."""
        targets = {m: locate(adapter, base, m, "weight", roles["vera_lambda_b"])
                   for m, roles in adapter.modules().items() if self.anchor(m, roles)}
        found = {m: base.find(t) for m, t in targets.items()}
        dims = self._dims(adapter, {m: tuple(t.shape) for m, t in found.items() if t is not None})
        dtype = next((STORED_DTYPES.get(t.dtype) for t in found.values() if t is not None), None)
        return Shared(*self.projections(adapter, dims, dtype or torch.float32), dims)

    def prepare_apply(self, adapter: Adapter, model: torch.nn.Module) -> Shared:
        """As :meth:`prepare_merge`, from the live model's weights."""
        named = dict(model.named_modules())
        weights = {m: weight_of(find_module(named, m, adapter))
                   for m, roles in adapter.modules().items() if self.anchor(m, roles)}
        dims = self._dims(adapter, {m: tuple(w.shape) for m, w in weights.items()})
        dtype = next(iter(weights.values())).dtype if weights else torch.float32
        return Shared(*self.projections(adapter, dims, dtype), dims)

    def module_delta(self, adapter: Adapter, module: str, roles: Mapping[str, str], target: str,
                     base_shape: tuple[int, ...], shared: Shared) -> Delta:
        a, b, (layout, in_features, out_features) = shared.a, shared.b, shared.dims[module]
        self._check_fits(adapter, a, b, module, roles, shared.dims[module])

        def delta(current: torch.Tensor) -> torch.Tensor:
            # PEFT's vera Linear.get_delta_weight: slice, scale rows, multiply, transpose for Conv1D
            lambda_b = adapter.tensor(roles["vera_lambda_b"]).to(current.device).float().unsqueeze(-1)
            lambda_d = adapter.tensor(roles["vera_lambda_d"]).to(current.device).float().unsqueeze(-1)
            sliced_a = a.to(current.device)[:, :in_features]
            sliced_b = b.to(current.device)[:out_features, :]
            d = (lambda_b * sliced_b) @ (lambda_d * sliced_a)
            return d.T if layout == "fan_in_fan_out" else d

        return delta

    def module_path(self, adapter: Adapter, module: str, roles: Mapping[str, str], layer: torch.nn.Module,
                    shared: Shared) -> Path:
        """``λ_b ⊙ F.linear(λ_d ⊙ F.linear(x, A[:, :in]), B[:out])``, as PEFT's forward adds it."""
        a, b, dims = shared.a, shared.b, shared.dims[module]
        self._check_fits(adapter, a, b, module, roles, dims)
        lambda_b = adapter.tensor(roles["vera_lambda_b"]).float()
        lambda_d = adapter.tensor(roles["vera_lambda_d"]).float()
        sliced_a, sliced_b = a[:, :dims[1]], b[:dims[2], :]
        return lambda mod, x: lambda_b * F.linear(lambda_d * F.linear(x, sliced_a), sliced_b)
