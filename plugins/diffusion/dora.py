"""DoRA as LyCORIS (and kohya's sd-scripts, which uses LyCORIS' code) saves it in kohya-key image-model files:
``lora_down`` / ``lora_up`` / ``alpha`` plus a ``dora_scale`` per module. The ``lycoris_dora`` method.

Why a method of its own rather than the ``lora`` method's DoRA (PEFT's ``lora_magnitude_vector``): LyCORIS
divides by the norm plus float32's epsilon, may take the norm per input column instead of per output row
(``wd_on_out=False``: ``dora_scale`` ``[1, in(, 1, 1)]``), stores the scale with the layer's number of
dimensions. The same numbers merged by PEFT's rule differ in the last bits (and, per column, entirely). The
factors, alpha and patterns are the ``lora`` method's (this class hands them to it); docs/diffusion.md, "DoRA",
has the maths.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from adaptools import plugin
from adaptools.plugin import (
    Adapter,
    AdapterFormatError,
    BaseInfo,
    Finding,
    IncompatibleBaseError,
    StoredTensorInfo,
    TensorUpdate,
)

from ..lora.lint import RULES as LORA_RULES
from ..lora.method import LoRA

NAME = "lycoris_dora"
ROLE = "dora_scale"
#: float32's machine epsilon, which LyCORIS adds to every norm (docs/diffusion.md, "DoRA")
EPSILON = torch.finfo(torch.float32).eps
OWN_RULES = {
    "DORA001": ("error", "dora_scale does not fit its module (neither [out, 1…] nor [1, in, 1…])"),
    "DORA002": ("error", "dora_scale holds NaN or infinity"),
    "DORA003": ("warning", "dora_scale has zero or negative entries (rows or columns zeroed or flipped)"),
}
FIXES = {"DORA001": "the file is damaged or the dora_scale belongs to another layer; save it again",
         "DORA002": "the training diverged or the file is damaged; use an earlier checkpoint",
         "DORA003": "a trained magnitude is a norm, so it is positive; check the file came out of training intact"}


class _Without:
    """A tensor store minus the ``dora_scale`` tensors: what the ``lora`` method sees of a DoRA adapter."""

    def __init__(self, store: Any):
        self._store = store

    def names(self) -> list[str]:
        return [n for n in self._store.names() if not n.endswith("." + ROLE)]

    def info(self, name: str) -> StoredTensorInfo:
        info: StoredTensorInfo = self._store.info(name)
        return info

    def get(self, name: str) -> torch.Tensor:
        tensor: torch.Tensor = self._store.get(name)
        return tensor

    def origin(self, name: str) -> tuple[str, str]:
        origin: tuple[str, str] = self._store.origin(name)
        return origin


def lora_view(adapter: Adapter) -> Adapter:
    """The adapter's plain-LoRA part (factors, alphas) as a ``lora`` adapter, for the LoRA method's checks and
    the writers."""
    return Adapter(method="lora", config=adapter.config, tensors=_Without(adapter.tensors), base=adapter.base,
                   provenance=adapter.provenance, source=adapter.source, read_format=adapter.read_format)


def axis_of(scale_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> str | None:
    """``"out"`` when a dora_scale of ``scale_shape`` holds one number per output row of a weight of
    ``weight_shape`` (``[out, 1…]``), ``"in"`` for one per input column (``[1, in, 1…]``), else None. When
    both fit (a layer with one output, or one input) the two rules give the same norm."""
    n = len(weight_shape)
    if len(scale_shape) != n or n < 2:
        return None
    if tuple(scale_shape) == (weight_shape[0],) + (1,) * (n - 1):
        return "out"
    if tuple(scale_shape) == (1, weight_shape[1]) + (1,) * (n - 2):
        return "in"
    return None


def decompose(weight: torch.Tensor, scale: torch.Tensor, axis: str) -> torch.Tensor:
    """LyCORIS' weight decomposition of ``weight`` (W + ΔW, fp32), in its own operation order: the L2 norm of
    each output row (``axis`` ``"out"``) or input column (``"in"``) over every other dimension, plus float32's
    epsilon; then ``weight · (scale / norm)``."""
    dims = weight.dim() - 1
    if axis == "out":
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(weight.shape[0], *[1] * dims) + EPSILON
    else:
        norm = (weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1, keepdim=True)
                .reshape(weight.shape[1], *[1] * dims).transpose(0, 1)) + EPSILON
    out: torch.Tensor = weight * (scale / norm)
    return out


class LycorisDoRA(plugin.AdapterMethod, plugin.Mergeable):
    name = NAME
    description = "LoRA with LyCORIS weight decomposition (DoRA in kohya-key image-model files: dora_scale)"
    roles = ("lora_A", "lora_B", ROLE)
    rules = {**LORA_RULES, **OWN_RULES}
    unsupported = {
        "unmerge": "the norm of the merged weight cannot be undone from the merged weight alone",
        "algebra": "a DoRA delta is not a low-rank product (dora_scale rescales the whole merged weight)",
        "plain": "a DoRA delta is not a low-rank product (dora_scale rescales the whole merged weight); merge it",
        "apply": "not supported yet: merge it instead",
        "bake": "a DoRA LoRA has nothing to bake", "init": "LyCORIS trains DoRA modules; adaptools reads them"}

    def __init__(self) -> None:
        self._lora = LoRA()

    def from_peft(self, peft_config: dict[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        """The ``lora`` method's config of the factors (per-module rank, alpha, scaling)."""
        return self._lora.from_peft(peft_config, {n: s for n, s in shapes.items() if not n.endswith("." + ROLE)})

    def to_peft(self, config: Mapping[str, Any]) -> dict[str, Any]:
        return self._lora.to_peft(config)

    def lint(self, adapter: Adapter, base: BaseInfo | None = None, *, check_values: bool = True) -> list[Finding]:
        """The LoRA method's findings on the factors, then each dora_scale's: its module's factors present,
        its shape (DORA001) and, with ``check_values``, its values (DORA002, DORA003)."""
        findings = self._lora.lint(lora_view(adapter), base, check_values=check_values)

        def add(rule: str, message: str, name: str) -> None:
            where = adapter.where(name)
            findings.append(Finding(rule, OWN_RULES[rule][0], message, FIXES[rule], where["path"], where["tensor"]))

        for module, roles in adapter.modules().items():
            name = roles.get(ROLE)
            if name is None or "lora_A" not in roles or "lora_B" not in roles:
                continue  # a dora_scale alone: the reader refuses it (no lora_down)
            weight = weight_shape(adapter, roles)
            shape = tuple(adapter.info(name).shape)
            if axis_of(shape, weight) is None:
                add("DORA001", f"dora_scale {list(shape)} fits neither the outputs nor the inputs of {module} "
                               f"(its factors make a {list(weight)} weight)", name)
                continue
            if not check_values:
                continue
            values = adapter.tensor(name).float()
            if not bool(values.isfinite().all()):
                add("DORA002", f"dora_scale of {module} holds {int((~values.isfinite()).sum())} NaN/Inf value(s)",
                    name)
            elif bool((values <= 0).any()):
                add("DORA003", f"dora_scale of {module} has {int((values <= 0).sum())} zero or negative "
                               "entries", name)
        return findings

    def summary(self, adapter: Adapter) -> dict[str, Any]:
        out = self._lora.summary(lora_view(adapter))
        axes: dict[str, int] = {}
        for roles in adapter.modules().values():
            if ROLE in roles and "lora_A" in roles and "lora_B" in roles:
                axis = axis_of(tuple(adapter.info(roles[ROLE]).shape), weight_shape(adapter, roles))
                key = {"out": "per output row", "in": "per input column"}.get(axis or "", "unfitting")
                axes[key] = axes.get(key, 0) + 1
        out["dora"] = "LyCORIS dora_scale, " + ", ".join(f"{n} {k}" for k, n in sorted(axes.items()))
        return out

    def merge_updates(self, adapter: Adapter, base: BaseInfo, weight: float = 1.0) -> list[TensorUpdate]:
        """One update per module: V = W + s·(B·A) (LyCORIS' order: the product, then the scale), then, where
        the module has a dora_scale, W' = :func:`decompose` (V); a module without one adds s·(B·A). At a
        ``weight`` other than 1, W + weight·(W' − W), as A1111 and ComfyUI apply a DoRA LoRA's strength (LyCORIS'
        own multiplier rule differs; docs/diffusion.md, "DoRA"). W is the weight as merged so far, as LyCORIS'
        ``merge_to`` reads it."""
        self.require("merge", adapter)
        updates = []
        for module, roles in adapter.modules().items():
            if "lora_A" in roles:
                updates.append(self._update(adapter, base, module, roles, weight))
        return updates

    def _update(self, adapter: Adapter, base: BaseInfo, module: str, roles: dict[str, str],
                weight: float) -> TensorUpdate:
        a_name, b_name, d_name = roles["lora_A"], roles["lora_B"], roles.get(ROLE)
        found = base.locate(module, "weight")
        if found is None:
            raise IncompatibleBaseError(f"the adapter changes {module}.weight but the base has no such tensor",
                                        **adapter.where(a_name), hint="the adapter was made for another model")
        base_shape = tuple(base.find(found).shape)  # type: ignore[union-attr]
        shape = weight_shape(adapter, roles)
        if len(base_shape) != len(shape) or base_shape[0] != shape[0] or \
                math.prod(base_shape[1:]) != math.prod(shape[1:]):
            raise IncompatibleBaseError(f"LoRA factors of {module} make a {list(shape)} weight, and base {found} "
                                        f"is {list(base_shape)}", **adapter.where(a_name),
                                        hint="the adapter was made for another model size")
        axis = None
        if d_name is not None:
            axis = axis_of(tuple(adapter.info(d_name).shape), base_shape)
            if axis is None:
                raise AdapterFormatError(f"dora_scale {list(adapter.info(d_name).shape)} fits neither the outputs "
                                         f"nor the inputs of {found} {list(base_shape)}", **adapter.where(d_name),
                                         hint=FIXES["DORA001"])
            values = adapter.tensor(d_name)
            if not bool(values.float().isfinite().all()):
                raise AdapterFormatError("dora_scale holds NaN or infinity", **adapter.where(d_name),
                                         hint=FIXES["DORA002"])
        s = ((adapter.config.get("modules") or {}).get(module) or {}).get("scaling")
        if not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s):
            raise AdapterFormatError(f"module {module} has no usable scaling in the config ({s!r})",
                                     **adapter.where(a_name), hint="read the file again, or fix its alpha")

        def fn(current: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
            a = adapter.tensor(a_name).to(current.device).float()
            b = adapter.tensor(b_name).to(current.device).float()
            diff = (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(current.shape) * s
            if axis is None:
                return current + diff * weight
            m = adapter.tensor(d_name).to(current.device).float()  # type: ignore[arg-type]
            merged = decompose(current + diff, m, axis)
            return merged if weight == 1 else current + weight * (merged - current)

        return TensorUpdate(found, "delta", fn, source=", ".join(n for n in (a_name, b_name, d_name) if n))


def weight_shape(adapter: Adapter, roles: Mapping[str, str]) -> tuple[int, ...]:
    """The weight a module's factors make: ``[out, in]``, a conv's ``[out, in, kh, kw]``."""
    a, b = tuple(adapter.info(roles["lora_A"]).shape), tuple(adapter.info(roles["lora_B"]).shape)
    return (b[0], *a[1:])
