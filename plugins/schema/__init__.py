"""The schema family: adaptools' canonical adapter file, one ``.safetensors`` whose header says what it is
(format.py). Every input format is read into the same shape; this format stores it as is, readable
without the training-time module tree or a config whose meaning changed across versions (docs/schema.md)."""

from typing import Any

from adaptools.plugin import hookimpl


@hookimpl
def register_formats(register: Any) -> None:
    from .format import SchemaFormat

    register(SchemaFormat())
