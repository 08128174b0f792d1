"""Commands that write a checkpoint through the merge engine with adapters: merge, unmerge, swap. Each builds
:class:`MergeOptions`, asks the engine for a plan and runs it; none holds logic of its own."""

from __future__ import annotations

from typing import Any

import click

from ..adapter_io import load
from ..checkpoint import Checkpoint
from ..engine import plan as plan_merge
from ..operations import unmerge as unmerge_op
from ..operations.convert import with_initial
from ..outputs import check_output
from .engine_common import _echo_plan, _engine_options, _finish, _run, _weighted, _write, engine_options
from .group import cli, emit_json
from .options import FINITE
from .quant_commands import quantize_options_of


@cli.command()
@click.argument("paths", nargs=-1, required=True, metavar="BASE ADAPTER [ADAPTER ...] OUT")
@click.option("--weight", "weights", type=FINITE, multiple=True,
              help="Weight of each adapter's delta, once per adapter in order (default 1).")
@engine_options("Output dtype; auto keeps the base's.")
@click.option("--requantize", is_flag=True,
              help="Quantized base only: write it quantized again (same settings; untouched layers copied byte "
                   "for byte) and report how much of each change survived.")
@click.option("--merge-base", type=click.Choice(["quantized", "original"]), default="quantized", show_default=True,
              help="Quantized base only: land the delta on the decoded weights, what QLoRA trained against, or on "
                   "the original 16-bit weights given by --original-base.")
@click.option("--original-base", metavar="PATH", help="The 16-bit checkpoint the quantized base was made from.")
@click.option("--initial", "initials", multiple=True, metavar="PATH",
              help="For an adapter trained on a modified base whose init cannot be recomputed (OLoRA/PiSSA-style): "
                   "the adapter saved right after init (once per adapter, in order).")
@click.option("--to", "to", metavar="CONTAINER",
              help="Write OUT in another container than a checkpoint folder: one a backend offers (`adaptools "
                   "plugins` lists them). An OUT ending in a container's suffix chooses it without --to.")
@click.option("--outtype", metavar="TYPE",
              help="The storage type, for containers that offer several (see the container's documentation).")
@click.option("--imatrix", metavar="FILE",
              help="GGUF output from a GGUF base: re-encode the changed tensors with this llama.cpp importance "
                   "matrix (llama-imatrix's .gguf or .dat), as llama-quantize --imatrix does.")
def merge(paths: tuple[str, ...], weights: tuple[float, ...], requantize: bool, merge_base: str,
          original_base: str | None, initials: tuple[str, ...], to: str | None, outtype: str | None,
          imatrix: str | None, **kw: Any) -> None:
    """Merge one or more adapters into BASE and write a full checkpoint to OUT.

    BASE is a Hugging Face checkpoint folder (model.safetensors, or shards
    with an index) or a hub reference. The merge streams one tensor at a
    time: memory stays near the largest tensor, whatever the model size.
    BASE may also be one model file of a format an installed backend reads
    (`adaptools plugins`); OUT is then a file of that format (--to, or its
    suffix), untouched tensors copied byte for byte.
    Deltas are computed in fp32 and rounded once to the output dtype, which
    gives PEFT's merge_and_unload bit for bit.

    Tied embeddings stay tied unless the adapter changes them differently;
    then an explicit lm_head.weight is written and tie_word_embeddings set
    to false, so the merged model behaves like the unmerged one.

    A quantized BASE (QLoRA on bitsandbytes 4-bit) is decoded and merged into
    a dense model in the quant state's dtype: the faithful result.
    --requantize writes it quantized again and warns how much of the
    fine-tune the rounding erased.

    --check NAME runs a validator on OUT before it is published (see
    `adaptools plugins`): --check logits (does OUT compute what base + adapter
    computes, within the output dtype's rounding? seconds on a CPU), --check
    generate (greedy continuations, first divergence), --check perplexity
    --eval-text FILE. A failed check exits 1 and keeps OUT, with the verdict
    in adaptools_checks.json and its model card (docs/validation.md).

    \b
    Examples:
      adaptools merge meta-llama/Llama-3.2-1B ./my-lora ./merged
      adaptools merge ./base ./style ./facts ./out --weight 0.7 --weight 1
      adaptools merge ./base ./my-lora ./out --dtype bf16 --shard-size 5GB
      adaptools merge ./base ./my-lora ./out --dry-run --json
      adaptools merge ./llama-nf4 ./my-qlora ./merged --check logits --check generate
      adaptools merge model-Q4_K_M.gguf ./my-lora merged.gguf --imatrix imatrix.gguf
    """
    if len(paths) < 3:
        raise click.UsageError("give BASE, at least one ADAPTER, and OUT")
    base, adapter_refs, out = paths[0], paths[1:-1], paths[-1]
    if weights and len(weights) != len(adapter_refs):
        raise click.UsageError(f"{len(weights)} --weight values for {len(adapter_refs)} adapters")
    if initials and len(initials) != len(adapter_refs):
        raise click.UsageError(f"{len(initials)} --initial values for {len(adapter_refs)} adapters")
    quantize = None
    if merge_base == "original":
        if not original_base:
            raise click.UsageError("--merge-base original needs --original-base PATH (the 16-bit checkpoint)")
        quantize = quantize_options_of(base) if requantize else None
        base, requantize = original_base, False
    elif original_base:
        raise click.UsageError("--original-base is only used with --merge-base original")
    options = _engine_options(kw, requantize=requantize, quantize=quantize, to=to, outtype=outtype,
                              imatrix=imatrix)
    allow_pickle, dry_run, json_ = kw["allow_pickle"], kw["dry_run"], kw["json_"]
    if not dry_run:
        check_output(out, kw["force"], [base, *adapter_refs, *initials])
    inputs = _weighted(adapter_refs, weights, "--weight", allow_pickle, base)
    for item, initial in zip(inputs, initials):
        item.adapter = with_initial(item.adapter, load(initial, allow_pickle=allow_pickle))
    if dry_run:
        data = plan_merge(base, inputs, options, out).to_json()
        emit_json(data) if json_ else _echo_plan(data)
        return
    _finish(_run(base, inputs, out, options, "merging", json_), json_, out)


@cli.command()
@click.argument("paths", nargs=-1, required=True, metavar="MERGED ADAPTER [ADAPTER ...] OUT")
@click.option("--weight", "weights", type=FINITE, multiple=True,
              help="The weight each adapter was merged with, once per adapter in order (default 1).")
@click.option("--base", "original", metavar="PATH",
              help="The original base: report how far OUT is from it (elements equal, max |Δ|, relative).")
@engine_options("Output dtype; auto keeps MERGED's.")
def unmerge(paths: tuple[str, ...], weights: tuple[float, ...], original: str | None, **kw: Any) -> None:
    """Take merged adapters back out of MERGED and write the model to OUT.

    The inverse of `adaptools merge`, streamed the same way: each adapter's
    delta is computed exactly as the merge computed it and subtracted, in
    fp32, rounded once. Merged again, the result gives MERGED back bit for
    bit (in every case measured), so it is the original base wherever the
    merge's own rounding kept the base's value, and at most one rounding of
    the merged value away elsewhere (docs/unmerge.md). Give --base ORIGINAL
    to measure how far OUT is from it. Adapters whose merge cannot be undone are refused, naming why (DoRA,
    replaced modules, trainable tokens, bottleneck folds with a singular map).

    \b
    Examples:
      adaptools unmerge ./merged ./my-lora ./base-again
      adaptools unmerge ./merged ./style ./facts ./base-again --weight 0.7 --weight 1
      adaptools unmerge ./merged ./my-lora ./base-again --base ./base --check logits
    """
    if len(paths) < 3:
        raise click.UsageError("give MERGED, at least one ADAPTER, and OUT")
    merged, refs, out = paths[0], paths[1:-1], paths[-1]
    options = _engine_options(kw)
    if original is not None:
        Checkpoint.open(original)  # refuse an unusable --base before anything is written
    if not kw["dry_run"]:
        check_output(out, kw["force"], [merged, *refs, *([original] if original else [])])
    removed = _weighted(refs, weights, "--weight", kw["allow_pickle"], merged)
    _write(unmerge_op.unmerge_plan(merged, removed, options), out, kw, "unmerging", original)


@cli.command()
@click.argument("merged")
@click.argument("out", type=click.Path())
@click.option("--remove", "removed", multiple=True, required=True, metavar="ADAPTER",
              help="An adapter merged into MERGED, to take out (repeatable).")
@click.option("--add", "added", multiple=True, required=True, metavar="ADAPTER",
              help="An adapter to merge in its place (repeatable).")
@click.option("--remove-weight", type=FINITE, multiple=True,
              help="The weight each removed adapter was merged with, once per --remove (default 1).")
@click.option("--add-weight", type=FINITE, multiple=True,
              help="Weight of each added adapter, once per --add (default 1).")
@engine_options("Output dtype; auto keeps MERGED's.")
def swap(merged: str, out: str, removed: tuple[str, ...], added: tuple[str, ...], remove_weight: tuple[float, ...],
         add_weight: tuple[float, ...], **kw: Any) -> None:
    """Replace merged adapters with others in one streamed pass, without the base.

    Switches a deployed model from one task-specific fine-tune to another:
    each --remove adapter is taken out (as `adaptools unmerge` does) and each
    --add adapter merged in (as `adaptools merge` does), tensor by tensor,
    rounding once. In fp32 the result equals a fresh merge of the added
    adapters into the base wherever unmerging recovers the base
    (docs/unmerge.md).

    \b
    Examples:
      adaptools swap ./merged-support --remove ./support-lora --add ./sales-lora ./merged-sales
      adaptools swap ./merged --remove ./a --add ./b ./out --check logits
    """
    options = _engine_options(kw)
    if not kw["dry_run"]:
        check_output(out, kw["force"], [merged, *removed, *added])
    taken = _weighted(removed, remove_weight, "--remove-weight", kw["allow_pickle"], merged)
    given = _weighted(added, add_weight, "--add-weight", kw["allow_pickle"], merged)
    _write(unmerge_op.unmerge_plan(merged, taken, options, given), out, kw, "swapping", None)
