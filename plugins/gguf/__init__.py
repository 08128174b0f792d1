"""The GGUF family: GGUF LoRA adapters as llama.cpp loads them, GGUF model files as merge bases, and GGUF
files as merge outputs (from a GGUF base or a dense Hugging Face one). gguf-py does the file work."""

from typing import Any

from adaptools.plugin import hookimpl


@hookimpl
def register_formats(register: Any) -> None:
    from .adapter_format import GGUFFormat

    register(GGUFFormat())


@hookimpl
def register_backends(register: Any) -> None:
    from .backend import GGUFBackend

    register(GGUFBackend())
