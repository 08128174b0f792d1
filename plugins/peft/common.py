"""What every PEFT method plugin needs besides its own maths: finding the base tensor a module changes,
full-tensor replacements (``modules_to_save``, saved biases), the layout of a weight matrix
(``nn.Linear`` or GPT-2 ``Conv1D``), swapping parameters and hooks in and out of a live model, and the
plumbing of lint findings. Public ``adaptools`` API only, like every plugin."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from adaptools.plugin import (
    Adapter,
    BaseInfo,
    BaseTensor,
    Finding,
    IncompatibleBaseError,
    TensorUpdate,
    count_nonfinite,
)

from ..lora.config import is_targeted  # PEFT's module matching, the same for every tuner


def locate(adapter: Adapter, base: BaseInfo, module: str, param: str, tensor: str) -> str:
    """The base parameter ``module.param`` that adapter tensor ``tensor`` changes; refuse if the base lacks it."""
    found = base.locate(module, param)
    if found is None:
        raise IncompatibleBaseError(
            f"the adapter changes {module}.{param} but the base has no such tensor", **adapter.where(tensor),
            hint="the adapter was made for another model (check base_model_name_or_path)")
    return found


def matrix_layout(base_shape: tuple[int, ...], out_features: int, in_features: int,
                  fan_in_fan_out: bool) -> str | None:
    """``"linear"`` for a weight stored ``[out, in]``, ``"fan_in_fan_out"`` for GPT-2 ``Conv1D`` (``[in, out]``),
    None if neither fits. A square weight follows the config's flag (PEFT sets it per layer type)."""
    out_in, in_out = (out_features, in_features), (in_features, out_features)
    if tuple(base_shape) == out_in and (out_in != in_out or not fan_in_fan_out):
        return "linear"
    if tuple(base_shape) == in_out:
        return "fan_in_fan_out"
    return None


def replacement_update(adapter: Adapter, base: BaseInfo, module: str, param: str, name: str) -> TensorUpdate:
    """A saved full tensor (``replace_<param>``) that replaces the base's.

    ``modules_to_save`` replaces one module's copy; a saved base layer (a resized vocabulary) replaces the
    storage itself, which a tied lm_head shares. PEFT matches ``modules_to_save`` with a plain ``endswith``.
    """
    target = locate(adapter, base, module, param, name)
    shape = adapter.info(name).shape
    base_shape = base.find(target).shape  # type: ignore[union-attr]
    if len(shape) != len(base_shape) or (shape[1:] != base_shape[1:]):
        raise IncompatibleBaseError(f"replacement shape {list(shape)} does not fit base {list(base_shape)}",
                                    **adapter.where(name))

    def fn(current: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        return adapter.tensor(name).to(current.device).float()

    saved = [m for m in adapter.config.get("modules_to_save") or [] if module.endswith(m)]
    kind = "replace_module" if saved else "replace"
    return TensorUpdate(target, kind, fn, shape=shape if shape != base_shape else None, source=name)


def replacement_updates(adapter: Adapter, base: BaseInfo) -> list[TensorUpdate]:
    """Every ``replace_<param>`` tensor of the adapter as a replacement update."""
    return [replacement_update(adapter, base, module, role[len("replace_"):], name)
            for module, roles in adapter.modules().items() for role, name in roles.items()
            if role.startswith("replace_")]


def find_module(named: Mapping[str, torch.nn.Module], module: str, adapter: Adapter) -> torch.nn.Module:
    """The live submodule for an adapter module path, tolerating a head-class prefix difference."""
    for candidate in (module, module.partition(".")[2], f"model.{module}"):
        if candidate in named:
            return named[candidate]
    raise IncompatibleBaseError(f"the model has no module {module}", path=adapter.source)


#: Installs a module's runtime hooks: (module path, roles, live module) -> hook handles.
HookInstaller = Callable[[str, dict[str, str], torch.nn.Module], list[Any]]


@contextmanager
def hooked(adapter: Adapter, model: torch.nn.Module, install: HookInstaller) -> Iterator[torch.nn.Module]:
    """The adapter applied to a live model for as long as the context lasts: saved full tensors swapped in,
    ``install`` called for every module with other roles; all undone on exit, even on error."""
    named = dict(model.named_modules())
    handles: list[Any] = []
    saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    try:
        for module_name, roles in adapter.modules().items():
            if not module_name:  # model-level tensors (VeRA's shared projections)
                continue
            layer = find_module(named, module_name, adapter)
            for role, tname in roles.items():
                if role.startswith("replace_"):
                    param = getattr(layer, role[len("replace_"):])
                    saved.append((param, param.data))
                    param.data = adapter.tensor(tname).to(param.dtype)
            if any(not r.startswith("replace_") for r in roles):
                handles.extend(install(module_name, roles, layer))
        yield model
    finally:
        undo(handles, saved)


def undo(handles: list[Any], saved: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> None:
    """Take a runtime application off a live model: its hooks removed, each swapped parameter given back the
    tensor it held (in reverse order, so a parameter swapped twice ends with its original)."""
    for h in handles:
        h.remove()
    for param, value in reversed(saved):
        param.data = value


class Lint:
    """Collects one adapter's findings for a method's rule table, with the checks every method shares."""

    def __init__(self, adapter: Adapter, rules: Mapping[str, tuple[str, str]], fixes: Mapping[str, str]):
        self.adapter, self.rules, self.fixes = adapter, rules, fixes
        self.findings: list[Finding] = []

    def add(self, rule: str, message: str, name: str | None = None, field: str | None = None,
            fix: str | None = None) -> None:
        where = self.adapter.where(name) if name else {"path": self.adapter.source, "tensor": None}
        self.findings.append(Finding(rule, self.rules[rule][0], message, fix or self.fixes[rule],
                                     where["path"], where["tensor"], field))

    def config_types(self, rule: str, types: Mapping[str, Any]) -> None:
        """Each present, non-null config field has the type PEFT's config class gives it."""
        for key, kind in types.items():
            value = self.adapter.config.get(key)
            if value is None:
                continue
            ints = kind is int or (isinstance(kind, tuple) and int in kind and float not in kind)
            if not isinstance(value, kind) or (isinstance(value, bool) and ints):
                self.add(rule, f"{key} is {value!r}", field=key)

    def roles(self, role_rule: str, dtype_rule: str, known: tuple[str, ...]) -> None:
        """Every tensor has a role the method knows (or ``replace_<param>``) and a floating-point dtype."""
        for name in self.adapter.tensor_names():
            role = name.rpartition(".")[2]
            if role not in known and not role.startswith("replace_"):
                self.add(role_rule, f"unknown tensor role {role!r}", name,
                         fix=f"known roles: {', '.join(known)}, replace_<param>")
            elif not self.adapter.info(name).dtype.startswith(("F", "BF")):
                self.add(dtype_rule, f"dtype {self.adapter.info(name).dtype} is not floating point", name)

    def finite(self, rule: str) -> None:
        """No NaN or Inf in any tensor (reads every tensor)."""
        for name in self.adapter.tensor_names():
            tensor = self.adapter.tensor(name)
            bad = count_nonfinite(tensor)
            if bad:
                self.add(rule, f"{bad} NaN/Inf value(s)", name)

    def targeted(self, rule: str, module: str, name: str) -> None:
        """target_modules (with exclude_modules and layers_to_transform) selects the module."""
        if self.adapter.config.get("target_modules") is not None and not is_targeted(self.adapter.config, module):
            self.add(rule, f"module {module} has weights but target_modules does not select it", name,
                     field="target_modules")

    def base_tensor(self, rule: str, base: BaseInfo, module: str, name: str, param: str = "weight") \
            -> BaseTensor | None:
        """The base tensor ``module.param``, or a finding that the base lacks it."""
        target = base.locate(module, param)
        if target is None:
            self.add(rule, f"the base has no {module}.{param}", name)
            return None
        return base.find(target)
