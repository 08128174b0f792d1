"""Commands that change how a checkpoint's weights are stored: dequantize and requantize."""

from __future__ import annotations

from typing import Any

import click

from .. import registry
from ..checkpoint import Checkpoint
from ..engine import QuantizeOptions
from ..engine.plan import quantizing_backends
from ..errors import InputError
from .engine_common import _report, engine_progress
from .group import cli
from .options import ParamType, command_line, dtype_option, force_option, json_option, shard_size_option


@cli.command()
@click.argument("base")
@click.argument("out", type=click.Path())
@dtype_option("Output dtype; auto uses each weight's original dtype (from its quant state).")
@shard_size_option
@force_option
@json_option
def dequantize(base: str, out: str, dtype: str, shard_size: int | None, force: bool, json_: bool) -> None:
    """Turn a quantized checkpoint into a dense one (any format `adaptools plugins`
    lists a backend for: bitsandbytes, FP8, compressed-tensors, GPTQ, AWQ, MXFP4).

    The output loads in transformers without the quantizer: quantization_config
    is removed and every quantized weight is decoded exactly as its library
    decodes it, one tensor at a time.

    \b
    Example:
      adaptools dequantize ./llama-3-8b-nf4 ./llama-3-8b-bf16
    """
    from ..operations.quantize import dequantize as dequantize_op

    with engine_progress("dequantizing", json_) as bar:
        summary = dequantize_op(base, out, dtype=dtype, shard_size=shard_size, force=force, command=command_line(),
                                progress=bar)
    _report(summary, json_)


def quantize_options_of(base: str) -> QuantizeOptions:
    """The settings a quantized checkpoint was made with, as the backend that made it reads its config."""
    config = Checkpoint.open(base).config.get("quantization_config") or {}
    for entry in registry.backends().values():
        options = entry.obj.quantize_options(config)
        if options is not None:
            return options  # type: ignore[no-any-return]
    raise InputError("the base is not a quantized checkpoint that an installed backend made", path=base,
                     hint="--merge-base original needs the quantized base as BASE")


class QuantType(ParamType):
    """A registered backend that can quantize dense weights (see `adaptools plugins`)."""

    name = "quant_type"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        names = quantizing_backends()
        if value not in names:
            self.fail(f"{value!r} is not one of {', '.join(names)}", param, ctx)
        return str(value)


@cli.command()
@click.argument("dense")
@click.argument("out", type=click.Path())
@click.option("--quant-type", type=QuantType(),
              help="The backend that quantizes (default: the first installed that can; see `adaptools plugins`).")
@click.option("--blocksize", type=click.Choice(["32", "64", "128", "256", "512", "1024", "2048", "4096"]),
              default="64", show_default=True, help="Elements per absmax block (transformers always uses 64).")
@click.option("--double-quant/--no-double-quant", default=True, show_default=True,
              help="Quantize the absmax values too (bnb_4bit_use_double_quant).")
@click.option("--skip-modules", default="", help="Comma-separated module names to keep dense (besides "
              "lm_head, embeddings and norms, which always stay dense).")
@force_option
@json_option
def requantize(dense: str, out: str, quant_type: str | None, blocksize: str, double_quant: bool, skip_modules: str,
               force: bool, json_: bool) -> None:
    """Quantize a dense checkpoint as transformers would (bitsandbytes NF4 by default; --quant-type picks
    another installed backend, e.g. fp8).

    Linear weights become 4-bit with bytes identical to bitsandbytes' own
    quantize_4bit; lm_head, embeddings and norms stay dense. The result
    loads with transformers' bitsandbytes integration (quantization_config
    is written). Quantizing costs accuracy; see `adaptools merge --help`.

    \b
    Example:
      adaptools requantize ./merged-bf16 ./merged-nf4
    """
    from ..operations.quantize import requantize as requantize_op

    quantize = QuantizeOptions(quant_type=quant_type or "", blocksize=int(blocksize), double_quant=double_quant,
                               skip_modules=tuple(filter(None, (m.strip() for m in skip_modules.split(",")))))
    with engine_progress("quantizing", json_) as bar:
        summary = requantize_op(dense, out, quantize, force=force, command=command_line(), progress=bar)
    _report(summary, json_)
