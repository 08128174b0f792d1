"""Stable Diffusion 1.x and SDXL single-file checkpoints as merge bases:
``adaptools merge sd_xl_base_1.0.safetensors my-lora.safetensors merged.safetensors``.

The backend opens one ``.safetensors`` in the original key naming (``model.diffusion_model.…``,
``cond_stage_model.…``, ``conditioner.embedders.…``, ``first_stage_model.…``) as a checkpoint whose tensors
carry the pipeline names adapters use (``unet.down_blocks.0…``, ``text_encoder.…``, ``text_encoder_2.…``;
ldm_names.py). Each name is a byte range of the file: a whole stored tensor, or one of the q, k and v row
blocks of OpenCLIP's fused ``in_proj_weight`` / ``in_proj_bias``, which are contiguous bytes. So the engine
streams, decodes and merges them as any dense tensor, copies untouched ones byte for byte, and the container
(single_file_writer.py) writes every piece back under its stored name, the three row blocks joined into
their one tensor again. Tensors no adapter names (the VAE, OpenCLIP's transposed ``text_projection``,
schedules) keep their stored names (docs/diffusion.md, "Single-file checkpoints").

FLUX.1 single files in Black Forest Labs' naming (``double_blocks.0.img_attn.qkv.weight``, optionally under
``model.diffusion_model.``) are opened the same way, their tensors named ``transformer.…`` and the fused ``qkv``
and ``linear1`` presented as row blocks (flux_single_file.py; docs/diffusion.md, "Flux single files").
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch

from adaptools import plugin
from adaptools.plugin import BaseInfo

from .flux_single_file import is_flux_single_file, present_flux, swap_halves
from .single_file_layout import SingleFile, components_of, is_single_file, present
from .single_file_writer import SingleFileContainer


class PipelineNames(BaseInfo):
    """The base as an adapter sees it, tolerating both spellings of a text encoder's inner paths: transformers
    5 saves ``CLIPTextModel`` without the ``text_model.`` level, older files name it (docs/diffusion.md,
    "Module paths"); the single file stores one, so an adapter's other spelling is tried too."""

    def locate(self, module: str, param: str) -> str | None:
        found = super().locate(module, param)
        head, _, rest = module.partition(".")
        if found is not None or head not in ("text_encoder", "text_encoder_2") or not rest:
            return found
        other = rest.removeprefix("text_model.") if rest.startswith("text_model.") else f"text_model.{rest}"
        name = f"{head}.{other}.{param}"
        return name if self.find(name) is not None else None


class SingleFileCheckpoint(plugin.Checkpoint):
    """A single-file checkpoint, for the engine: its pieces as stored tensors, located by pipeline names."""

    def base_info(self) -> BaseInfo:
        info = super().base_info()
        return PipelineNames(info.tensors, info.config, info.aliases, info.path)

    def read(self, name: str, handle: BinaryIO | None = None) -> torch.Tensor:
        """A presented tensor's value; one stored with its row halves exchanged (Flux's final modulation) is
        given in the presented order, so whatever reads values through here (``lora init``) sees the diffusers
        tensor. The merge reads the stored bytes and goes through the exchange itself (single_file_writer.py)."""
        value = super().read(name, handle)
        opened = getattr(self.opened_by, "base", None)
        return swap_halves(value) if isinstance(opened, SingleFile) and name in opened.swapped else value


class SingleFileBackend(plugin.Backend):
    """Opens single-file checkpoints and offers their container. The registered instance holds no file;
    :meth:`open_checkpoint` binds a new one to the file it opens (``base``), which the container reads."""

    name = "sd-single-file"
    description = ("Stable Diffusion 1.x / SDXL and FLUX.1 single-file checkpoints (.safetensors in the original "
                   "model.diffusion_model. / BFL naming) as merge bases")

    def __init__(self, base: SingleFile | None = None):
        self.base = base

    def containers(self) -> Sequence[plugin.OutputContainer]:
        return (SingleFileContainer(),)

    def open_checkpoint(self, path: Path) -> plugin.Checkpoint | None:
        if path.suffix.lower() != ".safetensors":
            return None
        header = plugin.read_header(path)
        keys = list(header.tensors)
        if is_single_file(keys):
            opened = present(path, dict(header.tensors), dict(header.metadata))
        elif is_flux_single_file(keys):
            opened = present_flux(path, dict(header.tensors), dict(header.metadata))
        else:
            return None
        pipelines = {"sdxl": "StableDiffusionXLPipeline", "flux": "FluxPipeline"}
        config: dict[str, Any] = {
            "architectures": [pipelines.get(opened.family, "StableDiffusionPipeline")],
            "tie_word_embeddings": False,
            "diffusion_single_file": {"family": opened.family, "components": components_of(opened.pieces)}}
        return SingleFileCheckpoint.from_file(path, config, opened.tensors, SingleFileBackend(opened))
