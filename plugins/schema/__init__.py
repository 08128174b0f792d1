"""The schema family: adaptools' canonical adapter file, one ``.safetensors`` whose header says what it is."""

from typing import Any

from adaptools.plugin import hookimpl


@hookimpl
def register_formats(register: Any) -> None:
    from .format import SchemaFormat

    register(SchemaFormat())
