"""What a FLUX.1 single-file checkpoint in Black Forest Labs' naming holds (``double_blocks.0.img_attn.qkv.weight``,
``single_blocks.0.linear1.weight``, optionally under ComfyUI's ``model.diffusion_model.``), for the single-file
backend (single_file.py) and its container (single_file_writer.py): each linear layer's weight and bias under the
diffusers name a LoRA uses (``transformer.transformer_blocks.0.attn.to_q.weight``; flux_names.py), as a byte
range of the file. A fused ``qkv`` is three row blocks, a single block's ``linear1`` four (q, k, v as wide as
the block's input, the MLP the rest), each contiguous bytes. Every other tensor (the norms) keeps its stored
name, so no adapter can change it (docs/diffusion.md, "Flux single files").

The final layer's modulation ``final_layer.adaLN_modulation.1`` is diffusers' ``norm_out.linear`` with its two
row halves (shift, scale) in the other order, so no byte range is the diffusers tensor. It is presented whole
under the diffusers name (its shape is the same) and marked ``swapped``; the container runs every update of it
through the exchange (:func:`swap_updates`): the update sees the stored tensor with its halves exchanged (the
diffusers tensor) and its result is exchanged back. Of the two exact ways this is the smaller: rows are only
moved, never computed, so the bits are the diffusers merge's for any row-wise update (a LoRA's weight and
lora_bias, DoRA's per-row norm) with no rule per method. Rewriting the adapter instead (``lora_B``'s row halves
exchanged) is exact for a LoRA only, and no plugin hook reaches an adapter with the base it goes into.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from adaptools.plugin import InputError, TensorInfo, TensorUpdate

from .flux_names import Layer, from_bfl, split_rows
from .single_file_layout import SingleFile

#: ComfyUI's prefix for the transformer's tensors (BFL's own files have none)
PREFIX = "model.diffusion_model."
#: The mark of a Flux transformer in BFL's names: a double block's fused image attention input
MARK = ".img_attn.qkv.weight"


def is_flux_single_file(keys: Sequence[str]) -> bool:
    """A checkpoint with a BFL-named Flux transformer (cheap: names only)."""
    return any(k.removeprefix(PREFIX).startswith("double_blocks.") and k.endswith(MARK) for k in keys)


def _prefix(keys: Sequence[str], path: Path) -> str:
    """The transformer's prefix: ComfyUI's or none; a file with both is two models' keys mixed."""
    prefixed = {k.startswith(PREFIX) for k in keys if k.removeprefix(PREFIX).startswith("double_blocks.")}
    if len(prefixed) > 1:
        key = next(k for k in keys if k.startswith("double_blocks."))
        raise InputError(f"holds Flux block tensors both with and without the {PREFIX} prefix", path=path,
                         tensor=key, hint="the file was assembled from two models; use the original checkpoint")
    return PREFIX if prefixed == {True} else ""


def _block(info: TensorInfo, first: int, rows: int) -> TensorInfo:
    """Rows ``first`` to ``first + rows`` of a stored tensor (row-major, so contiguous bytes)."""
    size = info.nbytes // info.shape[0]
    return TensorInfo(info.dtype, (rows, *info.shape[1:]), info.begin + first * size,
                      info.begin + (first + rows) * size)


def _split(path: Path, stored: dict[str, TensorInfo], layer_key: str, layer: Layer) -> list[int]:
    """The rows of each diffusers layer in a fused layer, from its weight's shape (flux_names.split_rows)."""
    key = f"{layer_key}.weight"
    weight = stored.get(key)
    rows = split_rows(layer, weight.shape[0], weight.shape[1]) if weight is not None and len(weight.shape) == 2 \
        else None
    if rows is None:
        parts = "q, k, v" if len(layer.modules) == 3 else "q, k, v and MLP"
        shape = list(weight.shape) if weight is not None else "missing"
        raise InputError(f"a fused Flux weight of shape {shape} does not split into its {parts} row blocks",
                         path=path, tensor=key, hint="the file is corrupt or not a FLUX.1 checkpoint")
    return rows


def present_flux(path: Path, stored: dict[str, TensorInfo], metadata: dict[str, str]) -> SingleFile:
    """Every stored tensor under the name an adapter uses for it (the stored key where none does)."""
    prefix = _prefix(list(stored), path)
    opened = SingleFile(path, stored, metadata, "flux")

    def add(name: str, key: str, part: int | None, info: TensorInfo) -> None:
        if name in opened.pieces:
            raise InputError(f"holds two tensors for {name} ({opened.pieces[name][0]} and {key})", path=path,
                             tensor=key, hint="the file was assembled from two models; use the original checkpoint")
        opened.pieces[name] = (key, part)
        opened.tensors[name] = info

    for key, info in stored.items():
        layer_path, _, param = key.removeprefix(prefix).rpartition(".")
        layer = from_bfl(layer_path) if key.startswith(prefix) and param in ("weight", "bias") else None
        if layer is None:
            add(key, key, None, info)  # no adapter names it
            continue
        if layer.swapped:
            if not info.shape or info.shape[0] % 2:
                raise InputError(f"the final layer's modulation of shape {list(info.shape)} does not split into "
                                 "its shift and scale halves", path=path, tensor=key,
                                 hint="the file is corrupt or not a FLUX.1 checkpoint")
            add(f"{layer.modules[0]}.{param}", key, None, info)
            opened.swapped.add(f"{layer.modules[0]}.{param}")
            continue
        if not layer.fused:
            add(f"{layer.modules[0]}.{param}", key, None, info)
            continue
        rows = _split(path, stored, f"{prefix}{layer_path}", layer)
        if param == "bias" and tuple(info.shape) != (sum(rows),):
            raise InputError(f"a fused Flux bias of shape {list(info.shape)} does not split into the weight's "
                             f"{len(rows)} row blocks {rows}", path=path, tensor=key,
                             hint="the file is corrupt or not a FLUX.1 checkpoint")
        first = 0
        for part, (module, count) in enumerate(zip(layer.modules, rows)):
            add(f"{module}.{param}", key, part, _block(info, first, count))
            first += count
        opened.blocks[key] = len(rows)
    return opened


def swap_halves(rows: torch.Tensor) -> torch.Tensor:
    """The tensor with its two row halves exchanged (its own inverse; the rows are even, present_flux checked)."""
    half = rows.shape[0] // 2
    return torch.cat((rows[half:], rows[:half]))


def _through_swap(update: TensorUpdate) -> TensorUpdate:
    def fn(current: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        swapped = swap_halves(current)
        # an update that does not read the original may be handed it aliasing current (TensorUpdate's contract)
        return swap_halves(update.fn(swapped, swap_halves(original) if update.needs_original else swapped))

    # no row blocks: a block of stored rows is not a block of the update's rows
    return replace(update, fn=fn, rows=None, row_delta=None)


def swap_updates(chain: Sequence[TensorUpdate]) -> tuple[TensorUpdate, ...]:
    """A chain of updates written for the diffusers tensor, applied to the stored one whose row halves are
    exchanged: each update conjugated by the exchange (rows only move, so the bits are the diffusers merge's)."""
    return tuple(_through_swap(u) for u in chain)
