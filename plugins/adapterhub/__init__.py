"""The AdapterHub family: bottleneck adapters (Houlsby, Pfeiffer, parallel) and the folder format the
``adapters`` library's ``save_adapter`` writes."""

from typing import Any

from adaptools.plugin import hookimpl


@hookimpl
def register_methods(register: Any) -> None:
    from .bottleneck import Bottleneck

    register(Bottleneck())


@hookimpl
def register_formats(register: Any) -> None:
    from .format import AdapterHubFormat

    register(AdapterHubFormat())
