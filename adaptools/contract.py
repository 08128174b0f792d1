"""What the registry checks of every registered object before anything uses it, so that a plugin that
claims what it does not implement is refused at load, with its name, instead of failing mid-operation."""

from __future__ import annotations

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
    if not (tensor or group):
        raise PluginContractError(
            f"plugin {plugin}: backend {backend.name!r} implements neither claims/decode/encode nor "
            "find_groups/group_info/decode_group", hint="see docs/plugins.md, Backends")


def check_validator_options(options: Any, plugin: str, name: str) -> None:
    for option in options:
        if not isinstance(option, ValidatorOption) or option.type.__name__ not in OPTION_TYPES:
            raise PluginContractError(f"plugin {plugin}: validator {name!r} declares option {option!r}",
                                      hint=f"declare ValidatorOption(name, type) with a type among {OPTION_TYPES}")
