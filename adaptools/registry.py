"""Look up methods, formats, backends and validators by name, knowing which plugin registered each.

The registry is built once, after plugins load: each register hook is called through pluggy's own call
path one plugin at a time (so ``ADAPTOOLS_TRACE_PLUGINS=1`` shows every call), every registered object
is stamped with its owner and checked against the contract (:mod:`adaptools.contract`), and a name
registered twice is an error that names both plugins. It is built again only when the set of plugins
changes (a test or an application registering one at run time); :func:`reset` forces that.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from . import contract
from .errors import AdaptoolsError, PluginConflictError, PluginContractError, UnknownPluginError
from .interfaces import AdapterFormat, AdapterMethod, Backend, Validator
from .plugins import load_plugins, plugin_distribution, pm

T = TypeVar("T")

KINDS: dict[str, tuple[str, type, Callable[[Any, str], None]]] = {
    "method": ("register_methods", AdapterMethod, contract.check_method),
    "format": ("register_formats", AdapterFormat, contract.check_format),
    "backend": ("register_backends", Backend, contract.check_backend),
    "validator": ("register_validators", Validator,
                  lambda v, plugin: contract.check_validator_options(v.options, plugin, v.name)),
}


@dataclass(frozen=True)
class Registered(Generic[T]):
    """A registered object and the plugin it came from."""

    obj: T
    plugin: str
    distribution: str | None
    version: str | None


_built: dict[str, dict[str, Registered[Any]]] = {}
#: The plugin objects ``_built`` was collected from, compared by identity. Not their ids: an unregistered plugin
#: that was garbage-collected can hand its id to a new one, which would then be served the old plugin's objects.
_built_for: tuple[object, ...] = ()


def reset() -> None:
    """Forget what was registered; the next lookup calls the hooks again."""
    _built.clear()


def _collect(kind: str) -> dict[str, Registered[Any]]:
    global _built_for
    load_plugins()
    current = tuple(pm.get_plugins())
    if len(current) != len(_built_for) or not all(any(p is q for q in _built_for) for p in current):
        _built.clear()
        _built_for = current
    if kind in _built:
        return _built[kind]
    hook_name, base_class, check = KINDS[kind]
    found: dict[str, Registered[Any]] = {}
    impls = getattr(pm.hook, hook_name).get_hookimpls()
    for impl in impls:  # registration order, one plugin at a time
        plugin_name = impl.plugin_name
        dist, version = plugin_distribution(impl.plugin)

        def register(obj: Any, _plugin: str = plugin_name, _dist: str | None = dist,
                     _version: str | None = version) -> None:
            if not isinstance(obj, base_class):
                raise PluginContractError(f"plugin {_plugin} registered {obj!r}, which is not a {base_class.__name__}")
            name = getattr(obj, "name", None)
            if not isinstance(name, str) or not name:
                raise PluginContractError(f"plugin {_plugin} registered a {kind} without a name")
            check(obj, _plugin)
            if name in found:
                raise PluginConflictError(
                    f"{kind} {name!r} is registered by both {found[name].plugin} and {_plugin}",
                    hint="uninstall one of them, or limit plugins with ADAPTOOLS_LOAD_PLUGINS")
            found[name] = Registered(obj, _plugin, _dist, _version)

        others = [i.plugin for i in impls if i.plugin is not impl.plugin]
        try:
            pm.subset_hook_caller(hook_name, remove_plugins=others)(register=register)
        except AdaptoolsError:
            raise
        except Exception as exc:  # a plugin's own bug (an abstract class instantiated, a typo): name the plugin
            raise PluginContractError(f"plugin {plugin_name} failed in {hook_name}: {type(exc).__name__}: {exc}",
                                      hint="fix or uninstall the plugin; ADAPTOOLS_LOAD_PLUGINS limits which load"
                                      ) from None
    _built[kind] = found
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
