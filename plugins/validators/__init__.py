"""The validators family: checks a merge runs on its output before publishing it (``--check perplexity``,
``logits``, ``generate``) and the ``eval`` command.

==============  ===================================================================================
module          holds
==============  ===================================================================================
loading         transformers, models, tokens and the evaluation text, loaded the same safe way for all
perplexity      the ``perplexity`` validator and the scoring
eval_command    the ``adaptools eval`` command (the perplexity of one model)
sides           reference and candidate of the comparing checks, and the dtype's tolerance
sequences       the token sequences both sides are given
logits          the ``logits`` validator
generate        the ``generate`` validator
==============  ===================================================================================

Other families are reached only through the registry (each adapter's method, to apply it at runtime).
"""

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
    from .eval_command import eval_command

    cli.add_command(eval_command)
