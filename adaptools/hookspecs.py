"""The hooks plugins implement. Each register hook hands the plugin a callback to call once per object.

The callback style (from ``llm``) lets the core stamp every method, format, backend and validator with the
plugin that registered it, and refuse duplicate names naming both plugins.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pluggy import HookimplMarker, HookspecMarker

if TYPE_CHECKING:
    import click

    from .interfaces import AdapterFormat, AdapterMethod, Backend, Validator

hookspec = HookspecMarker("adaptools")
hookimpl = HookimplMarker("adaptools")


@hookspec
def register_methods(register: Callable[[AdapterMethod], None]) -> None:
    """Register adapter methods: ``register(LoRA())``."""


@hookspec
def register_formats(register: Callable[[AdapterFormat], None]) -> None:
    """Register adapter file formats (readers and writers): ``register(PeftFormat())``."""


@hookspec
def register_backends(register: Callable[[Backend], None]) -> None:
    """Register weight backends (how a stored base weight decodes to dense and back)."""


@hookspec
def register_validators(register: Callable[[Validator], None]) -> None:
    """Register validators that operations run with ``--check NAME``."""


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add commands to the ``adaptools`` click group."""
