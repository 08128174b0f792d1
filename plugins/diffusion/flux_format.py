"""The BFL / ComfyUI key style of FLUX.1 LoRAs as an adapter format: ``diffusion_model.<BFL layer>`` with
``lora_down.weight``/``lora_up.weight`` (or ``lora_A.weight``/``lora_B.weight``) and an optional ``alpha``, and
CLIP-L text-encoder layers under ``text_encoders.clip_l.transformer.``; XLabs' attention LoRAs
(``double_blocks.N.processor.qkv_lora1.down.weight``, with or without ``diffusion_model.``) too. Reading is
flux_read.py's (shared with the kohya style, which names the same layers); writing is flux_write.py's, with
ComfyUI's ``lora_down``/``lora_up`` suffixes (docs/diffusion.md, "Flux").
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from adaptools import plugin
from adaptools.plugin import Adapter, ReadOptions, WriteOptions

from . import flux_read
from .common import lora_file_keys
from .flux_write import write
from .lint import RULES, alpha_warnings

PREFIXES = ("diffusion_model.", "text_encoders.clip_l.transformer.")
#: XLabs' keys have no prefix; a key under these counts only with ``.processor.`` (a Flux checkpoint in BFL's
#: names is no adapter)
XLABS = ("double_blocks.", "single_blocks.")


class BflFormat(plugin.AdapterFormat):
    name = "bfl"
    description = "FLUX.1 LoRA in BFL / ComfyUI keys (.safetensors, diffusion_model.double_blocks.… with lora_down/up)"
    writes_directory = False

    def detect(self, path: Path) -> bool:
        keys = lora_file_keys(path)
        if keys is None:
            return False
        # any BFL-prefixed key claims the file, so that a stray key is named by read()
        return any(k.startswith(PREFIXES) or (k.startswith(XLABS) and ".processor." in k) for k in keys)

    def read(self, path: Path, options: ReadOptions) -> Adapter:
        parsed, problems = flux_read.scan(path)
        return flux_read.build(parsed, problems, options.validate)

    rules = RULES

    def lint(self, path: Path, adapter: Adapter | None, options: ReadOptions) -> list[plugin.Finding]:
        """The file's problems (before reading), then where diffusers scales it differently (after)."""
        if not path.is_file():
            return []
        if adapter is None:
            return [p.finding(path) for p in flux_read.scan(path)[1]]
        return alpha_warnings(adapter, path)

    def base_mismatch(self, adapter: Adapter, base_config: Mapping[str, Any]) -> str | None:
        from .single_file_layout import family_mismatch  # a single-file base of another family (docs/diffusion.md)

        return family_mismatch(adapter, base_config)

    def write(self, adapter: Adapter, path: Path, options: WriteOptions = WriteOptions()) -> None:
        write(adapter, path, "bfl")
