"""What the registry checks of every registered object before anything uses it, so that a plugin that
claims what it does not implement is refused at load, with its name, instead of failing mid-operation."""

from __future__ import annotations

import inspect
from typing import Any

from .errors import PluginContractError
from .interfaces import AdapterFormat, AdapterMethod, Backend, ValidatorOption, implemented_operations

#: Option types a validator may declare.
OPTION_TYPES = ("str", "int", "float", "bool", "Path")


def check_method(method: AdapterMethod, plugin: str) -> None:
    """A method's declared ``operations`` (if it declares them) must be exactly what it implements."""
    cls = type(method)
    implemented = implemented_operations(cls)
    declared = cls.__dict__.get("operations")
    for klass in cls.__mro__[1:]:
        if declared is not None or klass is AdapterMethod:
            break
        declared = klass.__dict__.get("operations")
    if declared is None or isinstance(declared, property):
        return
    claimed = frozenset(declared)
    missing = sorted(claimed - implemented)
    if missing:
        raise PluginContractError(
            f"plugin {plugin}: method {method.name!r} lists {', '.join(missing)} in `operations` but does not "
            f"implement it", hint="implement the capability (see docs/plugins.md) or drop it from `operations`")
    unlisted = sorted(implemented - claimed)
    if unlisted:
        raise PluginContractError(
            f"plugin {plugin}: method {method.name!r} implements {', '.join(unlisted)} but its `operations` does "
            "not list it", hint="drop the `operations` attribute: adaptools derives it from what the class implements")


def check_format(fmt: AdapterFormat, plugin: str) -> None:
    if not fmt.can_read and not fmt.can_write:
        raise PluginContractError(f"plugin {plugin}: format {fmt.name!r} can neither read nor write",
                                  hint="implement read() or write()")


def check_backend(backend: Backend, plugin: str) -> None:
    cls = type(backend)
    tensor = all(getattr(cls, n) is not getattr(Backend, n) for n in ("claims", "decode", "encode"))
    group = all(getattr(cls, n) is not getattr(Backend, n) for n in ("find_groups", "group_info", "decode_group"))
    # a file backend: opens a single-file base whose stored tensors other backends decode (docs/plugins.md)
    opens = cls.open_checkpoint is not Backend.open_checkpoint and cls.containers is not Backend.containers
    if not (tensor or group or opens):
        raise PluginContractError(
            f"plugin {plugin}: backend {backend.name!r} implements neither claims/decode/encode nor "
            "find_groups/group_info/decode_group nor open_checkpoint/containers", hint="see docs/plugins.md, Backends")
    if group and cls.encode_group is not Backend.encode_group and not _takes_settings(cls.decode_group):
        # The engine decodes every group it encoded, passing the settings it encoded with (docs/outputs.md,
        # "Never garbage"); a decode_group without that argument would fail mid-merge, after hours of work.
        raise PluginContractError(
            f"plugin {plugin}: backend {backend.name!r} encodes groups but its decode_group does not take "
            "`settings`", hint="add `settings=None` to decode_group (see docs/plugins.md, Backends)")


def _takes_settings(function: Any) -> bool:
    """Whether ``decode_group(param, read, names, settings)`` can be called with the fourth argument."""
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return True  # a builtin or C callable: nothing to inspect, trust it
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return True
    if any(p.name == "settings" for p in parameters):
        return True
    positional = [p for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                      inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 5  # self, param, read, names, settings


def check_validator_options(options: Any, plugin: str, name: str) -> None:
    for option in options:
        if not isinstance(option, ValidatorOption) or option.type.__name__ not in OPTION_TYPES:
            raise PluginContractError(f"plugin {plugin}: validator {name!r} declares option {option!r}",
                                      hint=f"declare ValidatorOption(name, type) with a type among {OPTION_TYPES}")
