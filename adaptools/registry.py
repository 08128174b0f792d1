"""Look up methods, formats, backends and validators by name, knowing which plugin registered each.

Hooks are called one plugin at a time so that every registered object is stamped with its owner; a name
registered twice is an error that names both plugins.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .errors import PluginConflictError, UnknownPluginError
from .interfaces import AdapterFormat, AdapterMethod, Backend, Validator
from .plugins import load_plugins, plugin_distribution, pm

T = TypeVar("T")

KINDS = {
    "method": ("register_methods", AdapterMethod),
    "format": ("register_formats", AdapterFormat),
    "backend": ("register_backends", Backend),
    "validator": ("register_validators", Validator),
}


@dataclass(frozen=True)
class Registered(Generic[T]):
    """A registered object and the plugin it came from."""

    obj: T
    plugin: str
    distribution: str | None
    version: str | None


def _collect(kind: str) -> dict[str, Registered[Any]]:
    load_plugins()
    hook_name, base_class = KINDS[kind]
    found: dict[str, Registered[Any]] = {}
    for impl in getattr(pm.hook, hook_name).get_hookimpls():  # registration order
        plugin_name = impl.plugin_name
        dist, version = plugin_distribution(impl.plugin)

        def register(obj: Any, _plugin: str = plugin_name, _dist: str | None = dist,
                     _version: str | None = version) -> None:
            if not isinstance(obj, base_class):
                raise TypeError(f"plugin {_plugin} registered {obj!r}, which is not a {base_class.__name__}")
            name = obj.name
            if name in found:
                raise PluginConflictError(
                    f"{kind} {name!r} is registered by both {found[name].plugin} and {_plugin}",
                    hint="uninstall one of them, or limit plugins with ADAPTOOLS_LOAD_PLUGINS")
            found[name] = Registered(obj, _plugin, _dist, _version)

        impl.function(register=register)
    return found


def _get(kind: str, name: str) -> Any:
    found = _collect(kind)
    if name not in found:
        close = difflib.get_close_matches(name, list(found), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(sorted(found)) or 'none'}"
        raise UnknownPluginError(f"unknown {kind} {name!r}", hint=hint)
    return found[name].obj


def methods() -> dict[str, Registered[AdapterMethod]]:
    return _collect("method")


def formats() -> dict[str, Registered[AdapterFormat]]:
    return _collect("format")


def backends() -> dict[str, Registered[Backend]]:
    return _collect("backend")


def validators() -> dict[str, Registered[Validator]]:
    return _collect("validator")


def get_method(name: str) -> AdapterMethod:
    return _get("method", name)  # type: ignore[no-any-return]


def get_format(name: str) -> AdapterFormat:
    return _get("format", name)  # type: ignore[no-any-return]


def get_backend(name: str) -> Backend:
    return _get("backend", name)  # type: ignore[no-any-return]


def get_validator(name: str) -> Validator:
    return _get("validator", name)  # type: ignore[no-any-return]
