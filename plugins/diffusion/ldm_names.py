"""The original Stable Diffusion key naming (LDM for SD 1.x, SGM for SDXL) against diffusers' pipeline names.

A single-file checkpoint stores the UNet under ``model.diffusion_model.`` in the original block layout
(``input_blocks.<i>.<j>``, ``middle_block.<j>``, ``output_blocks.<i>.<j>``), the CLIP text encoder under
``cond_stage_model.transformer.`` (SD 1.x) or ``conditioner.embedders.0.transformer.`` (SDXL) in transformers'
own names, and SDXL's OpenCLIP bigG encoder under ``conditioner.embedders.1.model.`` in open_clip's names,
its attention's q, k and v stacked as row blocks of one ``attn.in_proj_weight`` / ``in_proj_bias``.
Adapters name diffusers' modules (``unet.down_blocks.0…``, ``text_encoder.…``, ``text_encoder_2.…``).

The rules both ways come from one table per part, built from the UNet's layout (how many resnets per level,
which up levels hold attention), so the inverse used to make test files is the same table read backwards
(docs/diffusion.md, "Single-file checkpoints"). Nothing here reads tensor data.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from adaptools.plugin import InputError

UNET = "model.diffusion_model."
#: CLIP ViT-L text encoders stored with transformers' names: prefix -> pipeline component
CLIP = {"cond_stage_model.transformer.": "text_encoder", "conditioner.embedders.0.transformer.": "text_encoder"}
#: SDXL's OpenCLIP bigG text encoder, stored with open_clip's names
OPEN_CLIP = "conditioner.embedders.1.model."
OPEN_CLIP_COMPONENT = "text_encoder_2"

#: A resnet's layers: original name -> diffusers name
RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "out_layers.0": "norm2", "out_layers.3": "conv2",
          "emb_layers.1": "time_emb_proj", "skip_connection": "conv_shortcut"}
_RESNET_BACK = {v: k for k, v in RESNET.items()}
#: UNet parts outside the blocks: original -> diffusers
FIXED = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
         "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
         "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
#: OpenCLIP layer parts: open_clip -> transformers' CLIP (inside ``text_model.encoder.layers.<k>.``)
OPEN_CLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                   "attn.out_proj": "self_attn.out_proj"}
_OPEN_CLIP_LAYER_BACK = {v: k for k, v in OPEN_CLIP_LAYER.items()}
#: OpenCLIP tensors outside the layers: open_clip -> transformers' CLIP
OPEN_CLIP_FIXED = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
                   "positional_embedding": "text_model.embeddings.position_embedding.weight",
                   "ln_final.weight": "text_model.final_layer_norm.weight",
                   "ln_final.bias": "text_model.final_layer_norm.bias"}
#: The three row blocks of a fused in-projection, in their stored order
QKV = ("q_proj", "k_proj", "v_proj")


@dataclass(frozen=True)
class Layout:
    """A UNet's block layout: ``levels`` resolution levels, ``per_level`` resnets in each down level (up levels
    have one more), and the up levels that hold attention (their upsampler moves to position 2)."""

    levels: int
    per_level: int
    up_attention: frozenset[int]


def unet_table(layout: Layout) -> dict[str, tuple[str, bool]]:
    """original block prefix -> (diffusers prefix, is a resnet) for every block of ``layout``."""
    n = layout.per_level
    table = {k: (v, False) for k, v in FIXED.items()}
    table.update({"middle_block.0": ("mid_block.resnets.0", True), "middle_block.1": ("mid_block.attentions.0", False),
                  "middle_block.2": ("mid_block.resnets.1", True)})
    for b in range(layout.levels):
        for j in range(n):
            i = b * (n + 1) + j + 1
            table[f"input_blocks.{i}.0"] = (f"down_blocks.{b}.resnets.{j}", True)
            table[f"input_blocks.{i}.1"] = (f"down_blocks.{b}.attentions.{j}", False)
        if b < layout.levels - 1:
            table[f"input_blocks.{(b + 1) * (n + 1)}.0.op"] = (f"down_blocks.{b}.downsamplers.0.conv", False)
        for j in range(n + 1):
            i = b * (n + 1) + j
            table[f"output_blocks.{i}.0"] = (f"up_blocks.{b}.resnets.{j}", True)
            table[f"output_blocks.{i}.1"] = (f"up_blocks.{b}.attentions.{j}", False)
        if b < layout.levels - 1:
            last = b * (n + 1) + n
            position = 2 if b in layout.up_attention else 1
            table[f"output_blocks.{last}.{position}.conv"] = (f"up_blocks.{b}.upsamplers.0.conv", False)
    return table


def _longest(segments: list[str], table: dict[str, tuple[str, bool]]) -> tuple[str, int] | None:
    for size in range(min(5, len(segments) - 1), 0, -1):
        prefix = ".".join(segments[:size])
        if prefix in table:
            return prefix, size
    return None


def _rename(key: str, table: dict[str, tuple[str, bool]], leaves: dict[str, str]) -> str | None:
    """``key`` with its block prefix swapped by ``table`` and a resnet's layer renamed by ``leaves``; None when
    no rule fits."""
    segments = key.split(".")
    found = _longest(segments, table)
    if found is None:
        return None
    prefix, size = found
    target, resnet = table[prefix]
    rest = segments[size:]
    if resnet:
        leaf = ".".join(rest[:-1])
        if leaf not in leaves:
            return None
        rest = [leaves[leaf], rest[-1]]
    return ".".join([target, *rest])


_INPUT = re.compile(r"input_blocks\.(\d+)\.")
_OUTPUT = re.compile(r"output_blocks\.(\d+)\.(\d+)\.(\w+)")


def layout_of_original(keys: Iterable[str], path: object = None) -> Layout:
    """The layout of a UNet from its original keys (without ``model.diffusion_model.``): the first
    downsampler (``input_blocks.<n+1>.0.op``) gives the resnets per level, the block count the levels."""
    keys = list(keys)
    inputs = {int(m.group(1)) for k in keys if (m := _INPUT.match(k))}
    ops = sorted({int(k.split(".")[1]) for k in keys if _INPUT.match(k) and k.split(".")[2:4] == ["0", "op"]})
    if not inputs:
        raise InputError("holds model.diffusion_model. keys but no input_blocks: not a Stable Diffusion UNet",
                         path=path, hint="adaptools merges into SD 1.x and SDXL single-file checkpoints")
    per_level = ops[0] - 1 if ops else max(inputs)
    levels = len(ops) + 1
    if per_level < 1 or ops != [(b + 1) * (per_level + 1) for b in range(len(ops))] or \
            max(inputs) + 1 != levels * (per_level + 1):
        raise InputError(f"the UNet's input_blocks ({max(inputs) + 1}, downsamplers at {ops}) do not follow the "
                         "Stable Diffusion layout", path=path, hint="the file is not an SD 1.x or SDXL checkpoint")
    up = set()
    for k in keys:
        m = _OUTPUT.match(k)
        if m and m.group(2) == "1" and m.group(3) != "conv":
            up.add(int(m.group(1)) // (per_level + 1))
    return Layout(levels, per_level, frozenset(up))


def layout_of_diffusers(names: Iterable[str]) -> Layout:
    """The same layout from a diffusers UNet's parameter names (for the inverse)."""
    names = list(names)
    levels = 1 + max(int(n.split(".")[1]) for n in names if n.startswith("down_blocks."))
    per_level = 1 + max(int(n.split(".")[3]) for n in names if n.startswith("down_blocks.0.resnets."))
    up = frozenset(int(n.split(".")[1]) for n in names if n.startswith("up_blocks.") and ".attentions." in n)
    return Layout(levels, per_level, up)


def unet_to_diffusers(key: str, layout: Layout) -> str | None:
    """An original UNet key (without ``model.diffusion_model.``) -> its diffusers name, or None."""
    return _rename(key, unet_table(layout), RESNET)


def unet_to_original(name: str, layout: Layout) -> str | None:
    """A diffusers UNet parameter name -> its original key (without ``model.diffusion_model.``), or None."""
    back = {target: (prefix, resnet) for prefix, (target, resnet) in unet_table(layout).items()}
    return _rename(name, back, _RESNET_BACK)


def open_clip_to_diffusers(key: str) -> tuple[str, ...] | None:
    """An OpenCLIP key (without its prefix) -> the transformers CLIP name(s) it holds: one name, or three for a
    fused in-projection (its q, k and v row blocks, in order); None for what has no plain counterpart
    (``text_projection`` is stored transposed, ``logit_scale`` has none)."""
    if key in OPEN_CLIP_FIXED:
        return (OPEN_CLIP_FIXED[key],)
    m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", key)
    m_fused = re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key)
    if m_fused:
        layer, param = m_fused.groups()
        return tuple(f"text_model.encoder.layers.{layer}.self_attn.{p}.{param}" for p in QKV)
    if m and m.group(2) in OPEN_CLIP_LAYER:
        return (f"text_model.encoder.layers.{m.group(1)}.{OPEN_CLIP_LAYER[m.group(2)]}.{m.group(3)}",)
    return None


def open_clip_to_original(name: str) -> tuple[str, int | None] | None:
    """A transformers CLIP name -> (OpenCLIP key, row block or None), the inverse of
    :func:`open_clip_to_diffusers`."""
    back = {v: k for k, v in OPEN_CLIP_FIXED.items()}
    if name in back:
        return back[name], None
    m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if not m:
        return None
    layer, part, param = m.groups()
    if part.startswith("self_attn.") and part.split(".", 1)[1] in QKV:
        return f"transformer.resblocks.{layer}.attn.in_proj_{param}", QKV.index(part.split(".", 1)[1])
    if part in _OPEN_CLIP_LAYER_BACK:
        return f"transformer.resblocks.{layer}.{_OPEN_CLIP_LAYER_BACK[part]}.{param}", None
    return None
