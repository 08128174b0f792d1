"""``adaptools eval``: the perplexity of one model, with adapters applied at runtime if given, on an
evaluation text. It is how adapters that cannot be merged (prefix, prompt and P-tuning, non-linear
bottlenecks) are scored, and it measures exactly what the ``perplexity`` check measures (perplexity.py).
"""

from __future__ import annotations

import json

import click

import adaptools
from adaptools.cli.options import allow_pickle_option, json_option

from .perplexity import DEFAULT_MAX_TOKENS, DEFAULT_WINDOW, Perplexity


@click.command(name="eval")
@click.argument("model")
@click.option("--adapter", "adapters", multiple=True, help="Apply this adapter at runtime, unmerged (repeatable).")
@click.option("--eval-text", required=True, metavar="FILE", help="A .txt or .jsonl (text field) file.")
@click.option("--max-tokens", type=click.IntRange(min=2), default=DEFAULT_MAX_TOKENS, show_default=True,
              help="Tokens to score at most.")
@click.option("--window", type=click.IntRange(min=2), default=DEFAULT_WINDOW, show_default=True,
              help="Tokens per scoring window.")
@allow_pickle_option
@json_option
def eval_command(model: str, adapters: tuple[str, ...], eval_text: str, max_tokens: int, window: int,
                 allow_pickle: bool, json_: bool) -> None:
    """Print the perplexity of MODEL (optionally with adapters) on an evaluation text.

    The text is tokenized with MODEL's tokenizer and scored in fixed,
    non-overlapping windows. Needs transformers (pip install 'adaptools[eval]').

    \b
    Example:
      adaptools eval ./merged --eval-text held-out.txt
      adaptools eval ./base --adapter ./my-lora --eval-text held-out.txt --json
      adaptools eval ./base --adapter ./my-prefix --eval-text held-out.txt   (prefix, prompt, P-tuning and bottleneck
                                       adapters, which cannot be merged, are scored this way)
    """
    Perplexity().check_options({"eval_text": eval_text})
    loaded = [adaptools.load(a, allow_pickle=allow_pickle) for a in adapters]
    ppl, tokens = Perplexity().measure(model, loaded, eval_text, max_tokens, window, allow_pickle=allow_pickle)
    if json_:
        click.echo(json.dumps({"model": model, "adapters": list(adapters), "perplexity": ppl, "tokens": tokens,
                               "window": window}, indent=2))
    else:
        click.echo(f"perplexity {ppl:.4f} over {tokens} tokens (windows of {window})")
