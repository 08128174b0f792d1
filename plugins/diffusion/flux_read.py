"""Reading FLUX.1 LoRAs in the key styles that name BFL's layers or flatten diffusers' names, into the ``lora``
method with module paths ``transformer.<diffusers module>`` (and ``text_encoder.<CLIP-L module>``):

- kohya/sd-scripts: ``lora_unet_<BFL layer, dots as _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``,
  text encoder ``lora_te1_…`` (or ``lora_te_…``);
- BFL / ComfyUI: ``diffusion_model.<BFL layer>.lora_down.weight`` (or ``.lora_A.weight``) ..., text encoder
  ``text_encoders.clip_l.transformer.<CLIP path>…``;
- OneTrainer: ``lora_transformer_<diffusers module, dots as _>…``;
- XLabs: ``(diffusion_model.)double_blocks.N.processor.qkv_lora1.down.weight`` ... (attention layers only, no
  alpha: scale 1).

The scale is kohya's rule in every style: alpha / rank per stored layer, no alpha = the rank. A LoRA on a fused
layer becomes one LoRA per diffusers layer as diffusers splits it: the down factor shared and the up factor cut
by rows, or, when the up factor is block-diagonal (rank a multiple of the parts, every off-diagonal block
zero), each part its own block of both factors with alpha / parts (docs/diffusion.md, "Flux").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adaptools import plugin
from adaptools.plugin import Adapter, AdapterFormatError, BaseRef, SafetensorsFile

from .common import PATTERN_RULE_VERSION, lora_config, read_alpha
from .flux_names import COMPOUND_NAMES as FLUX_NAMES
from .flux_names import Layer, from_bfl, from_flat, from_xlabs, is_flux_module, split_rows
from .flux_store import Piece, PieceStore
from .lint import Problem
from .names import COMPOUND_NAMES as SD_NAMES
from .names import components, split_flat

#: key prefixes of the Flux styles -> (key style, what follows the prefix)
PREFIXES = {
    "lora_unet_": ("kohya", "bfl-flat"),
    "diffusion_model.": ("bfl", "bfl"),
    "double_blocks.": ("xlabs", "xlabs"),
    "single_blocks.": ("xlabs", "xlabs"),
    "lora_transformer_": ("onetrainer", "diffusers-flat"),
    "lora_te1_": (None, "clip-flat"),
    "lora_te_": (None, "clip-flat"),
    "text_encoders.clip_l.transformer.": (None, "clip"),
}
SUFFIXES = {"lora_down.weight": "down", "lora_A.weight": "down", "lora_up.weight": "up", "lora_B.weight": "up",
            "alpha": "alpha", "down.weight": "down", "up.weight": "up"}
#: the first segments of an SD UNet module: a kohya key under lora_unet_ that starts so is from another family
SD_UNET_HEADS = ("down_blocks_", "up_blocks_", "mid_block_", "input_blocks_", "middle_block_", "output_blocks_",
                 "conv_in", "conv_out", "time_embedding_", "add_embedding_")


def _prefix(key: str) -> str | None:
    return next((p for p in PREFIXES if key.startswith(p)), None)


def is_flux_key(key: str) -> bool:
    """Whether a key names a Flux layer (decides which reader takes a kohya-prefixed file)."""
    prefix = _prefix(key)
    if prefix is None or PREFIXES[prefix][0] is None:
        return False
    name = key[len(prefix):].partition(".")[0] if prefix.endswith("_") else key[len(prefix):]
    if prefix == "lora_unet_":
        return from_flat(name) is not None
    return True


@dataclass
class FluxParsed:
    """One file's layers, split into the schema's modules."""

    path: Path
    file: SafetensorsFile
    pieces: dict[str, Piece] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    alphas: dict[str, float | None] = field(default_factory=dict)
    #: stored layer name (key without suffix) -> its alpha's stored type (None: no alpha), for the writer
    alpha_dtypes: dict[str, str | None] = field(default_factory=dict)
    styles: set[str] = field(default_factory=set)
    te_prefix: str | None = None


def _module_of(prefix: str, name: str) -> tuple[Layer | None, str | None]:
    """(Flux layer, or text-encoder module path) a stored name without its suffix maps to."""
    kind = PREFIXES[prefix][1]
    if kind == "bfl-flat":
        return from_flat(name), None
    if kind == "bfl":
        return (from_xlabs(name) if ".processor." in name else from_bfl(name)), None
    if kind == "xlabs":
        return from_xlabs(prefix + name), None
    if kind == "diffusers-flat":
        module = "transformer." + split_flat(name, FLUX_NAMES)
        return (Layer(name, (module,)) if is_flux_module(module) else None), None
    return None, "text_encoder." + (split_flat(name, SD_NAMES) if kind == "clip-flat" else name)


def scan(path: Path) -> tuple[FluxParsed, list[Problem]]:
    """Every layer of a Flux file as schema modules, and the problems that make the file unusable (each key
    that maps to no layer is one). Refuses outright what cannot be read at all."""
    file = SafetensorsFile(path)
    parsed = FluxParsed(path=path, file=file)
    problems: list[Problem] = []
    found: dict[tuple[str, str], dict[str, str]] = {}
    for key in file.keys():
        prefix = _prefix(key)
        if prefix is None:
            problems.append(Problem("DIFF003", "is not a Flux LoRA key (lora_unet_<BFL layer>, diffusion_model.<BFL "
                                               "layer>, lora_transformer_…, lora_te1_…)", key))
            continue
        rest = key[len(prefix):]
        suffix = next((s for s in SUFFIXES if rest.endswith("." + s)), None)
        if suffix is None:
            problems.append(Problem("DIFF003", f"unknown tensor suffix in {rest!r}", key,
                                    "adaptools reads plain LoRA factors (lora_down/lora_up or lora_A/lora_B, alpha); "
                                    "DoRA and LoRA biases are not supported yet", unsupported=True))
            continue
        name = rest[: -len(suffix) - 1]
        if prefix == "lora_unet_" and name.startswith(SD_UNET_HEADS):
            problems.append(Problem("DIFF002", "a Stable Diffusion UNet key in a Flux LoRA: keys of two model "
                                               "families are mixed", key))
            continue
        style = PREFIXES[prefix][0]
        if style:
            parsed.styles.add(style)
        if prefix in ("lora_te_", "lora_te1_"):
            parsed.te_prefix = prefix.rstrip("_")
        slot = found.setdefault((prefix, name), {})
        part = SUFFIXES[suffix]
        if part in slot:
            raise AdapterFormatError(f"two tensors are the {part} factor of {prefix}{name}: {slot[part]!r} and "
                                     f"{key!r}", path=path, tensor=key)
        slot[part] = key
    for (prefix, name), slot in found.items():
        layer, te_module = _module_of(prefix, name)
        any_key = next(iter(slot.values()))
        if layer is None and te_module is None:
            problems.append(Problem("DIFF003", f"{name!r} names no layer of a FLUX.1 transformer", any_key))
            continue
        for part in ("down", "up"):
            if part not in slot:
                raise AdapterFormatError(f"layer has no {part} factor", path=path, tensor=any_key,
                                         hint="the file is incomplete; save it again")
        down, up = slot["down"], slot["up"]
        rank, out_features, in_features = _factors(file, down, up, path)
        alpha = read_alpha(file, slot["alpha"], path, problems) if "alpha" in slot else None
        parsed.alpha_dtypes[f"{prefix}{name}"] = file.info(slot["alpha"]).dtype if "alpha" in slot else None
        if te_module is not None:
            _add(parsed, te_module, Piece(file, down), Piece(file, up), rank, alpha)
            continue
        assert layer is not None
        _split(parsed, layer, down, up, rank, out_features, in_features, alpha)
    return parsed, problems


def _factors(file: SafetensorsFile, down: str, up: str, path: Path) -> tuple[int, int, int]:
    """(rank, out, in) of a linear LoRA pair, after checking the two fit."""
    d, u = file.info(down).shape, file.info(up).shape
    if len(d) != 2 or len(u) != 2:
        raise AdapterFormatError(f"down factor {list(d)} and up factor {list(u)} are not a linear LoRA pair (every "
                                 "Flux layer is linear)", path=path, tensor=down,
                                 hint="the file is damaged or holds another method")
    if u[1] != d[0]:
        raise AdapterFormatError(f"down factor has rank {d[0]} but the up factor {list(u)} expects {u[1]}",
                                 path=path, tensor=up,
                                 hint="the down and up tensors of this layer do not belong together")
    if d[0] < 1:
        raise AdapterFormatError("rank 0", path=path, tensor=down, hint="drop this layer")
    return int(d[0]), int(u[0]), int(d[1])


def _add(parsed: FluxParsed, module: str, down: Piece, up: Piece, rank: int, alpha: float | None) -> None:
    if module in parsed.ranks:
        raise AdapterFormatError(f"two layers map to module {module}", path=parsed.path, tensor=down.key,
                                 hint="the file holds one layer twice under two key styles; keep one")
    parsed.pieces[f"{module}.lora_A"], parsed.pieces[f"{module}.lora_B"] = down, up
    parsed.ranks[module], parsed.alphas[module] = rank, alpha


def _split(parsed: FluxParsed, layer: Layer, down: str, up: str, rank: int, out_features: int, in_features: int,
           alpha: float | None) -> None:
    """One stored layer's LoRA as one LoRA per diffusers module (diffusers' split, docs/diffusion.md "Flux")."""
    file = parsed.file
    if layer.swapped and out_features % 2:
        raise AdapterFormatError(f"up factor has {out_features} rows; the final layer's modulation has an even "
                                 "number (shift and scale)", path=parsed.path, tensor=up, hint="the file is damaged")
    rows = split_rows(layer, out_features, in_features)
    if rows is None:
        what = "q, k and v" if len(layer.modules) == 3 else "q, k, v (as wide as the input) and the MLP"
        raise AdapterFormatError(f"up factor has {out_features} rows, which do not split into {what} of "
                                 f"{layer.bfl}", path=parsed.path, tensor=up,
                                 hint="the file is damaged or was made for another model")
    n = len(layer.modules)
    starts = [sum(rows[:i]) for i in range(n)]
    sparse = n > 1 and layer.block_diagonal and rank % n == 0 and _block_diagonal(file.get(up), rows, rank // n)
    for i, module in enumerate(layer.modules):
        r0, r1 = starts[i], starts[i] + rows[i]
        if sparse:
            part = rank // n
            cols = (i * part, (i + 1) * part)
            _add(parsed, module, Piece(file, down, rows=cols), Piece(file, up, rows=(r0, r1), cols=cols), part,
                 None if alpha is None else alpha / n)
        else:
            up_piece = Piece(file, up, rows=(r0, r1) if n > 1 else None, swap=layer.swapped)
            _add(parsed, module, Piece(file, down), up_piece, rank, alpha)


def _block_diagonal(up: torch.Tensor, rows: list[int], part: int) -> bool:
    """Whether every block of ``up`` off its diagonal (row part i, column part j != i) is zero."""
    start = 0
    for i, height in enumerate(rows):
        block = up[start:start + height]
        for j in range(len(rows)):
            if j != i and bool(block[:, j * part:(j + 1) * part].any()):
                return False
        start += height
    return True


def build(parsed: FluxParsed, problems: list[Problem], validate: bool) -> Adapter:
    """The schema adapter of a parsed Flux file (``lora`` config with each module's rank and alpha, family
    ``flux``, and what writing the kohya style back needs)."""
    if not parsed.ranks:
        if problems:
            raise problems[0].error(parsed.path)
        raise AdapterFormatError("holds no LoRA layers", path=parsed.path, hint="is this a Flux LoRA?")
    if validate and problems:
        raise problems[0].error(parsed.path)
    alphas = {m: (parsed.ranks[m] if a is None else a) for m, a in parsed.alphas.items()}
    config = lora_config(parsed.ranks, alphas)
    config["peft_version"] = PATTERN_RULE_VERSION
    shapes = {n: piece.shape() for n, piece in parsed.pieces.items()}
    full = plugin.get_method("lora").from_peft(config, shapes)
    style = "kohya" if "kohya" in parsed.styles or not parsed.styles else sorted(parsed.styles)[0]
    full["model_family"] = "flux"
    full["components"] = components(parsed.ranks)
    dtypes = [d for d in parsed.alpha_dtypes.values() if d]
    facts: dict[str, Any] = {"alpha_dtype": max(set(dtypes), key=dtypes.count) if dtypes else None,
                             "alpha_dtypes": {},
                             "alpha_absent": sorted(m for m, a in parsed.alphas.items() if a is None)}
    if parsed.te_prefix:
        facts["te_prefix"] = parsed.te_prefix
    full["diffusion"] = {"key_style": style, "family_evidence": "FLUX.1 transformer layers are adapted",
                         "kohya": facts}
    return Adapter(method="lora", config=full, tensors=PieceStore(parsed.pieces), base=BaseRef(),
                   provenance={"source_format": style, "source": str(parsed.path)}, source=str(parsed.path))
