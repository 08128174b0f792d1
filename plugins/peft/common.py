"""What every PEFT method plugin needs besides its own maths: finding the base tensor a module changes,
full-tensor replacements (``modules_to_save``, saved biases), the layout of a weight (``nn.Linear``, GPT-2
``Conv1D``, a conv kernel seen as a matrix), and swapping parameters and hooks in and out of a live model.
Module matching is in ``matching.py``, the lint rules in ``lint.py``, the base of additive methods in
``additive.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from adaptools.plugin import Adapter, BaseInfo, IncompatibleBaseError, TensorUpdate


def locate(adapter: Adapter, base: BaseInfo, module: str, param: str, tensor: str) -> str:
    """The base parameter ``module.param`` that adapter tensor ``tensor`` changes; refuse if the base lacks it."""
    found = base.locate(module, param)
    if found is None:
        raise IncompatibleBaseError(
            f"the adapter changes {module}.{param} but the base has no such tensor", **adapter.where(tensor),
            hint="the adapter was made for another model (check base_model_name_or_path)")
    return found


def weight_layout(shape: tuple[int, ...], out_features: int, in_features: int | None = None,
                  fan_in_fan_out: bool = False, *, conv: bool = False) -> str | None:
    """How a weight of ``shape`` holds a layer with ``out_features`` outputs and ``in_features`` inputs:
    ``"linear"`` (``[out, in]``), ``"fan_in_fan_out"`` (GPT-2 ``Conv1D``, ``[in, out]``), ``"conv"`` (with
    ``conv``: a kernel ``[out, ...]`` whose other sizes multiply to ``in``, as a flattened matrix sees it), or
    None if none fits. A square weight follows the config's ``fan_in_fan_out`` (PEFT sets it per layer type).
    ``in_features`` None: any input size (the output size alone decides, as for VeRA's scaling vector)."""
    shape = tuple(shape)
    if len(shape) != 2:
        fits = conv and len(shape) > 2 and shape[0] == out_features and math.prod(shape[1:]) == in_features
        return "conv" if fits else None
    for inputs in (shape[1], shape[0]) if in_features is None else (in_features,):
        out_in, in_out = (out_features, inputs), (inputs, out_features)
        if shape == out_in and (out_in != in_out or not fan_in_fan_out):
            return "linear"
        if shape == in_out:
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


def weight_of(layer: torch.nn.Module) -> torch.Tensor:
    """The layer's ``weight`` (a parameter: ``nn.Module`` attribute access is typed loosely)."""
    weight = layer.weight
    assert isinstance(weight, torch.Tensor), f"{type(layer).__name__}.weight is not a tensor"
    return weight


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
