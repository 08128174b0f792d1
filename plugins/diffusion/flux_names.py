"""FLUX.1 module names: Black Forest Labs' original names (what kohya/sd-scripts, ComfyUI and BFL's own code use)
and diffusers' ``FluxTransformer2DModel`` names (the schema's, under the ``transformer`` component).

Most BFL layers are one diffusers layer under another name. Two are not: a double block's fused attention
input ``img_attn.qkv`` (``txt_attn.qkv``) is diffusers' three ``to_q``/``to_k``/``to_v`` (``add_q_proj``...),
and a single block's ``linear1`` is ``to_q``/``to_k``/``to_v`` and ``proj_mlp`` stacked by rows; the final
layer's modulation ``final_layer.adaLN_modulation.1`` is diffusers' ``norm_out.linear`` with its two halves of
rows (shift, scale) swapped. docs/diffusion.md ("Flux") has the table and how a LoRA on a fused layer becomes
one LoRA per diffusers layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: BFL layer inside a double block -> diffusers layers inside ``transformer_blocks.N`` (several: rows stacked)
DOUBLE = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "txt_mod.lin": ("norm1_context.linear",),
}
#: BFL layer inside a single block -> diffusers layers inside ``single_transformer_blocks.N``
SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
#: BFL layers outside the blocks -> diffusers layers
TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
#: XLabs' attention LoRAs (``double_blocks.N.processor.qkv_lora1``...): name -> (block kind, diffusers layers)
XLABS = {
    ("double_blocks", "qkv_lora1"): ("attn.to_q", "attn.to_k", "attn.to_v"),
    ("double_blocks", "proj_lora1"): ("attn.to_out.0",),
    ("double_blocks", "qkv_lora2"): ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    ("double_blocks", "proj_lora2"): ("attn.to_add_out",),
    ("single_blocks", "qkv_lora"): ("attn.to_q", "attn.to_k", "attn.to_v"),
    ("single_blocks", "proj_lora"): ("proj_out",),
}
#: the one layer whose rows BFL and diffusers order differently: two halves, swapped
SWAPPED = "final_layer.adaLN_modulation.1"

#: diffusers' Flux module names that hold an underscore (for splitting OneTrainer's flattened names)
COMPOUND_NAMES = (
    "single_transformer_blocks", "transformer_blocks", "to_q", "to_k", "to_v", "to_out", "add_q_proj",
    "add_k_proj", "add_v_proj", "to_add_out", "ff_context", "norm1_context", "proj_mlp", "proj_out", "norm_out",
    "x_embedder", "context_embedder", "time_text_embed", "timestep_embedder", "text_embedder",
    "guidance_embedder", "linear_1", "linear_2",
)

_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Layer:
    """One BFL layer in diffusers terms: the diffusers modules (with ``transformer.``) its rows go to, in order,
    and whether its two row halves are swapped."""

    bfl: str
    modules: tuple[str, ...]
    swapped: bool = False
    #: whether a block-diagonal up factor splits into blocks (XLabs' loader always shares the down factor)
    block_diagonal: bool = True

    @property
    def fused(self) -> bool:
        return len(self.modules) > 1


def from_bfl(path: str) -> Layer | None:
    """A BFL layer path (``double_blocks.0.img_attn.qkv``) -> its diffusers layers, or None if it names none."""
    if path in TOP:
        return Layer(path, (f"transformer.{TOP[path]}",), swapped=path == SWAPPED)
    match = _BLOCK.match(path)
    if match is None:
        return None
    kind, index, inner = match.groups()
    table, block = (DOUBLE, "transformer_blocks") if kind == "double_blocks" else (SINGLE, "single_transformer_blocks")
    if inner not in table or str(int(index)) != index:
        return None
    return Layer(path, tuple(f"transformer.{block}.{index}.{m}" for m in table[inner]))


_XLABS = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.processor\.([a-z_0-9]+)$")


def from_xlabs(path: str) -> Layer | None:
    """An XLabs name (``double_blocks.0.processor.qkv_lora1``) -> its diffusers layers, or None."""
    match = _XLABS.match(path)
    if match is None:
        return None
    kind, index, name = match.groups()
    modules = XLABS.get((kind, name))
    if modules is None or str(int(index)) != index:
        return None
    block = "transformer_blocks" if kind == "double_blocks" else "single_transformer_blocks"
    return Layer(path, tuple(f"transformer.{block}.{index}.{m}" for m in modules), block_diagonal=False)


def from_flat(flat: str) -> Layer | None:
    """A kohya flattened BFL name (``double_blocks_0_img_attn_qkv``, without ``lora_unet_``) -> its layer."""
    return _FLAT_TOP.get(flat) or _from_flat_block(flat)


_FLAT_TOP = {k.replace(".", "_"): Layer(k, (f"transformer.{v}",), swapped=k == SWAPPED) for k, v in TOP.items()}
_FLAT_INNER = {"double_blocks": {k.replace(".", "_"): k for k in DOUBLE},
               "single_blocks": {k.replace(".", "_"): k for k in SINGLE}}
_FLAT_BLOCK = re.compile(r"^(double_blocks|single_blocks)_(\d+)_(.+)$")


def _from_flat_block(flat: str) -> Layer | None:
    match = _FLAT_BLOCK.match(flat)
    if match is None:
        return None
    kind, index, inner = match.groups()
    dotted = _FLAT_INNER[kind].get(inner)
    return None if dotted is None else from_bfl(f"{kind}.{index}.{dotted}")


def layers_of(modules: set[str]) -> tuple[list[Layer], list[str]]:
    """The BFL layers that hold these diffusers modules (``transformer.…``), and the modules no BFL layer holds."""
    by_module: dict[str, Layer] = {}
    for path in sorted({_bfl_of(m) for m in modules} - {None}):  # type: ignore[type-var]
        layer = from_bfl(path)  # type: ignore[arg-type]
        if layer is not None:
            by_module.update({m: layer for m in layer.modules})
    seen: dict[str, Layer] = {}
    missing = []
    for module in sorted(modules):
        layer = by_module.get(module)
        if layer is None:
            missing.append(module)
        else:
            seen[layer.bfl] = layer
    return list(seen.values()), missing


_TOP_BY_DIFFUSERS = {v: k for k, v in TOP.items()}
_DIFFUSERS_BLOCK = re.compile(r"^transformer\.(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


def _bfl_of(module: str) -> str | None:
    """The BFL layer path that holds the diffusers module ``transformer.…``, or None."""
    inner = module.removeprefix("transformer.")
    if inner in _TOP_BY_DIFFUSERS:
        return _TOP_BY_DIFFUSERS[inner]
    match = _DIFFUSERS_BLOCK.match(module)
    if match is None:
        return None
    kind, index, rest = match.groups()
    table, bfl = (DOUBLE, "double_blocks") if kind == "transformer_blocks" else (SINGLE, "single_blocks")
    return next((f"{bfl}.{index}.{k}" for k, v in table.items() if rest in v), None)


def is_flux_module(module: str) -> bool:
    """Whether a schema module path is a layer of a Flux transformer (any key style maps onto these)."""
    return _bfl_of(module) is not None


def split_rows(layer: Layer, out_features: int, in_features: int) -> list[int] | None:
    """How many output rows of a fused layer each diffusers module gets, from the layer's own shape; None when
    the shape cannot be split that way. ``qkv``: three equal parts. ``linear1``: q, k and v as wide as the input
    (the block's hidden size), the MLP the rest."""
    n = len(layer.modules)
    if n == 3:
        return [out_features // 3] * 3 if out_features % 3 == 0 and out_features > 0 else None
    if n == 4:
        rest = out_features - 3 * in_features
        return [in_features] * 3 + [rest] if rest > 0 else None
    return [out_features]
