"""kohya files that name the SDXL UNet in the original SGM block layout (``lora_unet_input_blocks_4_1_…``,
``lora_unet_middle_block_…``, ``lora_unet_output_blocks_…``, what sd-scripts writes when it trains on its own
SGM UNet) read onto diffusers' module paths with the single-file table of ldm_names.py, so there is one
mapping between the two namings (docs/diffusion.md, "SGM block names").

A LoRA file does not say its UNet's layout; it is taken from the keys: two resnets per level (every SD 1.x,
2.x and SDXL UNet) unless a key sits where that layout has a downsampler, then the fewest that fits, and an up
level holds attention when a key names its attention or an upsampler after it.
"""

from __future__ import annotations

from collections.abc import Iterable

from .ldm_names import FIXED, Layout, unet_to_diffusers, unet_to_original
from .names import COMPOUND_NAMES, SGM_BLOCKS, split_flat

#: Module names of the original UNet that hold an underscore, to split a flattened name
VOCABULARY = (*COMPOUND_NAMES, *SGM_BLOCKS, "in_layers", "out_layers", "emb_layers", "skip_connection",
              "time_embed", "label_emb")
#: First segments of the original UNet's parts outside the blocks (``time_embed``, ``label_emb``, ``out``)
OUTSIDE = frozenset(k.split(".")[0] for k in FIXED) - set(SGM_BLOCKS)


def is_sgm(flat: str) -> bool:
    """Whether a flattened UNet module name (without ``lora_unet_``) starts with an original block name."""
    return flat.startswith(SGM_BLOCKS)


def is_original(flat: str) -> bool:
    """Whether it names a part of the original UNet, a block or a part outside them (read so in a file that
    uses the block names)."""
    return is_sgm(flat) or original_path(flat).split(".")[0] in OUTSIDE


def original_path(flat: str) -> str:
    """A flattened original name -> its dotted original module path (``input_blocks.4.1.proj_in``)."""
    return split_flat(flat, VOCABULARY)


def _fits(per_level: int, inputs: set[tuple[int, str]]) -> bool:
    """Whether ``per_level`` resnets per level puts every input-block key where that layout has it: a
    downsampler (``<i>.0.op``) at each multiple of per_level + 1, nothing else there."""
    return all((i % (per_level + 1) == 0) == (rest == "0.op") for i, rest in inputs if i > 0)


def layout_of(paths: Iterable[str]) -> Layout:
    """The UNet layout a file's original module paths imply (see the module docstring)."""
    inputs: set[tuple[int, str]] = set()
    outputs: set[tuple[int, str, str]] = set()
    for path in paths:
        parts = path.split(".")
        if len(parts) >= 3 and parts[0] == "input_blocks" and parts[1].isdigit():
            inputs.add((int(parts[1]), ".".join(parts[2:4])))
        if len(parts) >= 4 and parts[0] == "output_blocks" and parts[1].isdigit():
            outputs.add((int(parts[1]), parts[2], parts[3]))
    per_level = 2 if _fits(2, inputs) else next((n for n in range(1, 65) if _fits(n, inputs)), 2)
    levels = 1 + max([i // (per_level + 1) for i, _ in inputs] + [i // (per_level + 1) for i, _, _ in outputs]
                     + [0])
    up = frozenset(i // (per_level + 1) for i, j, leaf in outputs
                   if (j == "1" and leaf != "conv") or (j == "2" and leaf == "conv"))
    return Layout(levels + 1, per_level, up)  # one more, so the last level seen keeps its upsampler


def to_diffusers(path: str, layout: Layout) -> str | None:
    """An original module path -> diffusers' module path in the UNet, or None when no rule fits."""
    name = unet_to_diffusers(f"{path}.weight", layout)
    return None if name is None else name.removesuffix(".weight")


def to_original(module: str, layout: Layout) -> str | None:
    """diffusers' UNet module path -> the original one (the inverse, for making test files)."""
    name = unet_to_original(f"{module}.weight", layout)
    return None if name is None else name.removesuffix(".weight")

