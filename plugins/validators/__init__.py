"""The validators family: checks a merge runs on its output before publishing it (``--check perplexity``,
``logits``, ``generate``) and the ``eval`` command."""

from typing import Any

from adaptools.plugin import hookimpl


@hookimpl
def register_validators(register: Any) -> None:
    from .generate import Generate
    from .logits import Logits
    from .perplexity import Perplexity

    register(Perplexity())
    register(Logits())
    register(Generate())


@hookimpl
def register_commands(cli: Any) -> None:
    from .perplexity import eval_command

    cli.add_command(eval_command)
