"""The plugin manager. Plugins are loaded lazily, on first use, never at import time.

Built-in plugins live in the ``adaptools_plugins`` package (the repository's ``plugins/`` folder), one
subpackage per family, and are loaded exactly like third-party ones. Third-party plugins are found
through the ``adaptools`` entry-point group. ``ADAPTOOLS_LOAD_PLUGINS=a,b`` restricts entry-point plugins
to those names (empty: none), and ``ADAPTOOLS_TRACE_PLUGINS=1`` prints every hook call to stderr.
"""

from __future__ import annotations

import importlib
import os
import sys
from importlib import metadata
from typing import Any

import pluggy

from . import hookspecs

ENTRY_POINT_GROUP = "adaptools"

#: The package of the built-in plugins; it names its own families (``adaptools_plugins.FAMILIES``), so the
#: core knows no plugin by name.
BUILTIN_PACKAGE = "adaptools_plugins"

pm = pluggy.PluginManager("adaptools")
pm.add_hookspecs(hookspecs)

_loaded = False


def load_plugins() -> None:
    """Load built-in and entry-point plugins once; validate every hookimpl against its spec."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    if os.environ.get("ADAPTOOLS_TRACE_PLUGINS"):
        def before(hook_name: str, hook_impls: Any, kwargs: Any) -> None:
            print(f"adaptools: hook {hook_name} -> {[i.plugin_name for i in hook_impls]}", file=sys.stderr)

        def after(outcome: Any, hook_name: str, hook_impls: Any, kwargs: Any) -> None:
            print(f"adaptools: hook {hook_name} done", file=sys.stderr)

        pm.add_hookcall_monitoring(before, after)
    only = os.environ.get("ADAPTOOLS_LOAD_PLUGINS")
    if only is None:
        names = sorted({ep.name for dist in metadata.distributions() for ep in dist.entry_points
                        if ep.group == ENTRY_POINT_GROUP})
    else:
        names = list(filter(None, (n.strip() for n in only.split(","))))
    for name in names:
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=name)
        except Exception as exc:  # a broken third-party plugin must not take the whole tool down
            print(f"adaptools: plugin {name!r} failed to load and is skipped: {exc}", file=sys.stderr)
    for module_name in builtin_plugins():
        if pm.get_plugin(module_name) is None:
            pm.register(importlib.import_module(module_name), name=module_name)
    pm.check_pending()


def builtin_plugins() -> list[str]:
    """The built-in families' module names, in the order their package gives."""
    package = importlib.import_module(BUILTIN_PACKAGE)
    return [f"{BUILTIN_PACKAGE}.{family}" for family in package.FAMILIES]


def plugin_distribution(plugin: object) -> tuple[str | None, str | None]:
    """(distribution name, version) of an entry-point plugin; the adaptools package for built-ins."""
    for plugin_obj, dist in pm.list_plugin_distinfo():
        if plugin_obj is plugin:
            return dist.metadata["name"], dist.version
    name = pm.get_name(plugin) or ""
    if name.startswith(BUILTIN_PACKAGE + "."):
        try:
            return "adaptools", metadata.version("adaptools")
        except metadata.PackageNotFoundError:
            return "adaptools", None
    return None, None
