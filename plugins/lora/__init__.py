"""The LoRA family: LoRA in every PEFT variant (rsLoRA, DoRA, OLoRA, PiSSA, patterns, biases, trainable
tokens, peft 0.2.0's ``enable_lora``), AdaLoRA (LoRA in SVD form) and VeRA (shared random projections),
and the ``init`` and ``extract`` commands."""

from typing import Any

from adaptools.plugin import hookimpl


@hookimpl
def register_methods(register: Any) -> None:
    from .adalora import AdaLoRA
    from .method import LoRA
    from .vera import VeRA

    register(LoRA())
    register(AdaLoRA())
    register(VeRA())


@hookimpl
def register_commands(cli: Any) -> None:
    from .commands import extract_command, init_command

    cli.add_command(init_command)
    cli.add_command(extract_command)
