"""The AdapterHub family: bottleneck adapters (Houlsby, Pfeiffer, parallel) and the folder format the
``adapters`` library's ``save_adapter`` writes. The method and the format live together because
AdapterHub folders hold only bottleneck adapters that adaptools reads, and PEFT has no bottleneck method.

bottleneck.py holds the method (roles, lint rules, the linear fold into a weight); config.py what a
config means; runtime.py the adapter applied to a live model; unfold.py the fold taken back out
(``unmerge``); format.py the folder format.
"""

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
