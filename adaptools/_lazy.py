"""Names imported on first use (PEP 562), for the two public modules: ``import adaptools`` and
``adaptools --version`` must not pay for torch."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_module(module_name: str, exports: Mapping[str, str], namespace: dict[str, Any]
                ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for a module whose public names are ``exports`` (name -> defining
    module relative to ``adaptools``, optionally ``module:attribute``)."""

    def getattr_(name: str) -> Any:
        where = exports.get(name)
        if where is None:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        module, _, attr = where.partition(":")
        value = getattr(importlib.import_module(module, "adaptools"), attr or name)
        namespace[name] = value
        return value

    def dir_() -> list[str]:
        return sorted({*namespace, *exports})

    return getattr_, dir_
