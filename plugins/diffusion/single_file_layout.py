"""What a Stable Diffusion single-file checkpoint holds, for the backend that opens it (single_file.py) and the
container that writes it (single_file_writer.py): every stored tensor under the pipeline name an adapter uses
(ldm_names.py), as a byte range of the file: a whole stored tensor, or one of the q, k, v row blocks of
OpenCLIP's fused in-projection. The model family and components it records let a LoRA of another family be
refused before anything is computed (docs/diffusion.md, "Single-file checkpoints").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptools import plugin
from adaptools.plugin import InputError, TensorInfo

from .ldm_names import (
    CLIP,
    OPEN_CLIP,
    OPEN_CLIP_COMPONENT,
    UNET,
    layout_of_original,
    open_clip_to_diffusers,
    unet_to_diffusers,
)

#: Where a presented name's bytes come from: the stored key, and its row block (0, 1, 2) or None (the whole)
Piece = tuple[str, int | None]
#: Original UNet block names, the mark of a Stable Diffusion UNet
BLOCKS = tuple(f"{UNET}{b}." for b in ("input_blocks", "middle_block", "output_blocks"))


@dataclass
class SingleFile:
    """One opened single-file checkpoint: its stored tensors (validated header) and metadata, and each
    presented name's piece and place."""

    path: Path
    stored: dict[str, TensorInfo]
    metadata: dict[str, str]
    family: str
    pieces: dict[str, Piece] = field(default_factory=dict)
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    #: stored key -> how many row blocks it is presented as (those not named: three, OpenCLIP's q, k, v)
    blocks: dict[str, int] = field(default_factory=dict)
    #: presented names whose stored tensor is the presented one with its two row halves exchanged (Flux's
    #: final modulation); the container merges into them through the swap (flux_single_file.swap_updates)
    swapped: set[str] = field(default_factory=set)


def is_single_file(keys: Sequence[str]) -> bool:
    """A checkpoint with an original-layout UNet (cheap: names only)."""
    return any(k.startswith(BLOCKS) for k in keys)


def family_of(keys: Sequence[str]) -> str:
    """``sdxl`` (SGM conditioner or the added embedding), ``sd2`` (OpenCLIP in ``cond_stage_model.model``), else
    ``sd1`` (docs/diffusion.md, "Single-file checkpoints")."""
    if any(k.startswith("conditioner.") or k.startswith(f"{UNET}label_emb.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    return "sd1"


def _rows(info: TensorInfo, part: int, path: Path, key: str) -> TensorInfo:
    """Row block ``part`` of three of a fused in-projection, as a tensor of its own."""
    shape = info.shape
    fused = (len(shape) == 2 and shape[0] == 3 * shape[1]) or (len(shape) == 1 and shape[0] % 3 == 0)
    if not fused or shape[0] == 0:
        raise InputError(f"a fused attention in-projection of shape {list(shape)} is not three stacked q, k, v "
                         "blocks", path=path, tensor=key, hint="the file is corrupt or not an SDXL checkpoint")
    rows = shape[0] // 3
    size = info.nbytes // 3
    return TensorInfo(info.dtype, (rows, *shape[1:]), info.begin + part * size, info.begin + (part + 1) * size)


def present(path: Path, stored: dict[str, TensorInfo], metadata: dict[str, str]) -> SingleFile:
    """Every stored tensor under the name an adapter uses for it (the stored key where none does)."""
    keys = list(stored)
    layout = layout_of_original([k[len(UNET):] for k in keys if k.startswith(UNET)], path)
    opened = SingleFile(path, stored, metadata, family_of(keys))
    tensors = opened.tensors

    def add(name: str, key: str, part: int | None, info: TensorInfo) -> None:
        if name in opened.pieces:
            raise InputError(f"holds two tensors for {name} ({opened.pieces[name][0]} and {key}): keys of two "
                             "checkpoint layouts are mixed", path=path, tensor=key,
                             hint="the file was assembled from two models; use the original checkpoint")
        opened.pieces[name] = (key, part)
        tensors[name] = info

    for key, info in stored.items():
        if key.startswith(UNET):
            name = unet_to_diffusers(key[len(UNET):], layout)
            if name is None:
                raise InputError("this UNet tensor has no place in a Stable Diffusion 1.x/SDXL UNet", path=path,
                                 tensor=key, hint="the file is not an SD 1.x or SDXL checkpoint (or is damaged)")
            add(f"unet.{name}", key, None, info)
            continue
        clip = next((p for p in CLIP if key.startswith(p)), None)
        if clip is not None:
            add(f"{CLIP[clip]}.{key[len(clip):]}", key, None, info)
            continue
        names = open_clip_to_diffusers(key[len(OPEN_CLIP):]) if key.startswith(OPEN_CLIP) else None
        if names is None:
            if key.startswith(f"{OPEN_CLIP}transformer.resblocks."):
                raise InputError("this OpenCLIP layer tensor has no place in a CLIP text encoder", path=path,
                                 tensor=key, hint="the file is not an SDXL checkpoint (or is damaged)")
            add(key, key, None, info)  # no adapter names it: kept under its stored name
        elif len(names) == 1:
            add(f"{OPEN_CLIP_COMPONENT}.{names[0]}", key, None, info)
        else:
            for part, name in enumerate(names):
                add(f"{OPEN_CLIP_COMPONENT}.{name}", key, part, _rows(info, part, path, key))
    return opened


def components_of(pieces: Mapping[str, Piece]) -> list[str]:
    return [c for c in ("unet", "text_encoder", "text_encoder_2", "transformer")
            if any(n.startswith(f"{c}.") for n in pieces)]


FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "flux": "FLUX.1"}


def family_mismatch(adapter: plugin.Adapter, base_config: Mapping[str, Any]) -> str | None:
    """Why an image-model LoRA cannot go into a single-file base (the formats' ``base_mismatch``): another model
    family, or a component the file lacks. None for any other base (a pipeline's component folders are
    checked by the pipeline merge)."""
    base = base_config.get("diffusion_single_file")
    if not isinstance(base, dict):
        return None
    family, why = adapter.config.get("model_family"), adapter.config.get("diffusion", {}).get("family_evidence")
    if family in FAMILY_NAMES and family != base["family"]:
        return (f"the adapter is an {FAMILY_NAMES[family]} LoRA ({why}); the base is an "
                f"{FAMILY_NAMES.get(base['family'], base['family'])} single-file checkpoint")
    missing = sorted(n for n in adapter.tensor_names() if n.split(".", 1)[0] not in base["components"])
    if missing:
        return (f"{len(missing)} adapter tensor(s) name a component the single file lacks: "
                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return None
