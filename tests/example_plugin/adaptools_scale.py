"""A complete third-party adaptools plugin in one module: the ``scale`` method.

Each adapted module has one tensor, ``<module>.scale`` of shape [out]; merging multiplies the base weight's
rows by it. It exists to prove that a plugin installed through the ``adaptools`` entry point is found,
listed and understood by ``adaptools info``.
"""

from __future__ import annotations

from typing import Any

from adaptools import plugin


class Scale(plugin.AdapterMethod):
    name = "scale"
    description = "Per-row scaling vectors (example plugin)"
    operations = frozenset({"info", "convert"})
    roles = ("scale",)

    def validate(self, adapter: plugin.Adapter, *, check_values: bool = True) -> None:
        for name in adapter.tensor_names():
            if plugin.split_name(name)[1] != "scale":
                raise plugin.AdapterFormatError("unknown role", **adapter.where(name))

    def summary(self, adapter: plugin.Adapter) -> dict[str, Any]:
        return {"scaled_modules": len(adapter.modules())}


@plugin.hookimpl
def register_methods(register):
    register(Scale())
