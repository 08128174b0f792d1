"""The LoRA plugin's own commands, added through ``register_commands``: ``init`` (an OLoRA or PiSSA adapter
and the residual base it trains on) and ``extract`` (a LoRA from the difference of two checkpoints).

They are LoRA's, not the core's: the core knows no method by name (docs/plugins.md, "Commands").
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import click

import adaptools
from adaptools import plugin
from adaptools.cli.options import (
    FINITE,
    POSITIVE_INT,
    SHARE,
    adapter_format_option,
    command_line,
    force_option,
    json_option,
)

from .initialization import RECOMPUTABLE_INITS

METHOD = "lora"


def initialize(base: str, out: str, *, options: dict[str, object], to_format: str = "peft", force: bool = False,
               write_base: str | None = None) -> Path:
    """A freshly initialised OLoRA/PiSSA adapter at ``out``, and optionally the residual base training uses
    (the init adapter merged with weight -1 as a plain LoRA: W - s·B0A0)."""
    plugin.check_output(out, force, [base], directory=plugin.get_format(to_format).writes_directory)
    if write_base:
        plugin.check_output(write_base, force, [base], directory=True)
    checkpoint = plugin.Checkpoint.open(base)
    method = plugin.get_method(METHOD)
    adapter = method.initialize(checkpoint.base_info(), checkpoint.read, options)  # type: ignore[attr-defined]
    saved = adaptools.save(adapter, out, format=to_format, force=force)
    if write_base:
        plain = replace(adapter, config={**adapter.config, "init_lora_weights": True})
        adaptools.merge(base, [adaptools.MergeInput(plain, -1.0)], write_base, force=force,
                        operation="init-residual", command=command_line())
    return saved


@click.command(name="init")
@click.argument("base")
@click.argument("out", type=click.Path())
@click.option("--method", "init", type=click.Choice(RECOMPUTABLE_INITS), default="olora", show_default=True,
              help="The initialisation (a LoRA whose factors start from the base's QR or SVD).")
@click.option("--rank", type=POSITIVE_INT, required=True, help="LoRA rank r.")
@click.option("--alpha", type=FINITE, help="lora_alpha (default: the rank).")
@click.option("--targets", required=True, help="Comma-separated target modules (PEFT target_modules).")
@click.option("--write-base", metavar="DIR", help="Also write the residual base W - s·B0A0 that training uses.")
@adapter_format_option("peft")
@force_option
def init_command(base: str, out: str, init: str, rank: int, alpha: float | None, targets: str,
                 write_base: str | None, to: str, force: bool) -> None:
    """Initialise an OLoRA (QR) or PiSSA (SVD) adapter from BASE, as PEFT would.

    These inits move the base's principal part into the adapter, so training
    runs on a residual base. PEFT recomputes it when it loads the adapter on
    the original base; --write-base writes it for other trainers. After
    training, `adaptools merge BASE ADAPTER OUT` recomputes the init on the fly,
    and `adaptools convert ADAPTER OUT --to lora --base BASE` gives a plain
    LoRA of rank 2r for the original base.

    \b
    Example:
      adaptools init ./llama ./olora-init --rank 16 --targets q_proj,v_proj
    """
    options: dict[str, object] = {"init": init, "rank": rank, "alpha": alpha,
                                  "targets": [t.strip() for t in targets.split(",") if t.strip()]}
    path = initialize(base, out, options=options, to_format=to, force=force, write_base=write_base)
    click.echo(f"wrote {path}" + (f" and the residual base {write_base}" if write_base else ""))


@click.command(name="extract")
@click.argument("base")
@click.argument("tuned")
@click.argument("out", type=click.Path())
@click.option("--rank", type=POSITIVE_INT, help="Rank of every extracted module.")
@click.option("--energy", type=SHARE, help="Per module, the smallest rank keeping this share of ‖ΔW‖².")
@click.option("--max-rank", type=POSITIVE_INT, default=256, show_default=True, help="Cap for --energy.")
@adapter_format_option("peft")
@force_option
@json_option
def extract_command(base: str, tuned: str, out: str, rank: int | None, energy: float | None, max_rank: int, to: str,
                    force: bool, json_: bool) -> None:
    """Extract a LoRA from the difference of two checkpoints (TUNED - BASE).

    Streams one weight at a time; each linear weight's change is factored by a
    seeded randomized SVD, conv kernels flattened (LoCon); changed embeddings,
    heads, norms and biases are saved whole (modules_to_save). Reports the
    share of each change kept. BASE and TUNED may be two diffusers pipeline
    folders: compared component by component, modules named unet.…,
    text_encoder.…; write them with --to kohya or --to diffusers.

    \b
    Example:
      adaptools extract ./llama-base ./llama-finetuned ./extracted-lora --rank 32
      adaptools extract ./sd15 ./sd15-tuned lora.safetensors --rank 32 --to kohya
    """
    plugin.check_output(out, force, [base, tuned], directory=plugin.get_format(to).writes_directory)
    result = adaptools.extract(base, tuned, method=METHOD, rank=rank, energy=energy, max_rank=max_rank)
    adaptools.save(result.adapter, out, format=to, force=force)
    if json_:
        click.echo(json.dumps({"output": out, "retained_energy": result.retained,
                               "modules_to_save": result.full_tensors}, indent=2))
    else:
        worst = min(result.retained.values()) if result.retained else 1.0
        click.echo(f"wrote {out}: {len(result.retained)} low-rank modules (lowest retained energy {worst:.1%}), "
                   f"{len(result.full_tensors)} full tensors")
