"""The fine-grained FP8 backends: a checkpoint's FP8 weights (``P.weight`` + ``P.weight_scale_inv``) seen as dense
parameters, decoded as transformers does and encoded back byte for byte as its quantizer does (docs/fp8.md).

The dense dtype of a weight is the model's (config.json's ``dtype``), which the group's own tensors do not
say, and the block size is config.json's ``weight_block_size``; the backend hooks that decode see only the
group's tensors. So, as for LLM.int8, one backend is registered per dense dtype, and only the one matching
the checkpoint claims its groups; the block sizes of a scan are tied to the checkpoint that was scanned
(its reader), and a weight read any other way gets the block every scan agrees on, or is refused
(docs/fp8.md, "Block size and dtype").
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from adaptools import plugin
from adaptools.plugin import BaseTensor, InputError

from .codec import FP8, dequantize, grid, quantize
from .layout import DEFAULT_BLOCK, HINT, SCALE_SUFFIX, Layout, block_of, fp8_config, model_dtype, scan

#: Backend name for each dense dtype: bfloat16 is what FP8 checkpoints (DeepSeek, Qwen3) are.
NAMES = {"BF16": "fp8", "F16": "fp8_fp16", "F32": "fp8_fp32"}


@dataclass(frozen=True)
class Fp8Options(plugin.QuantizeOptions):
    """``QuantizeOptions`` with what an FP8 checkpoint's config says: its block and its whole
    ``quantization_config`` (written unchanged into a ``--merge-base original --requantize`` output)."""

    block_size: tuple[int, int] = DEFAULT_BLOCK
    config: dict[str, Any] | None = field(default=None, compare=False)


def check_scales(scale: torch.Tensor, name: str) -> None:
    """Block scales must be positive and finite: transformers' quantizer never writes anything else."""
    if scale.dtype != torch.float32 or not bool((torch.isfinite(scale) & (scale > 0)).all()):
        raise InputError("block scales with NaN, Inf, zero or negative values", tensor=name, hint=HINT)


class Fp8(plugin.Backend):
    """FP8 weights in a checkpoint whose dense dtype is ``dense`` (BF16, F16 or F32)."""

    def __init__(self, dense: str):
        self.dense = dense
        self.dtype = next(t.torch for t in plugin.FLOAT_TYPES if t.code == dense)
        self.name = NAMES[dense]  # type: ignore[misc]
        self.description = (f"fine-grained FP8 weights (float8_e4m3fn + block scales) in a "  # type: ignore[misc]
                            f"{str(self.dtype)[6:]} model: transformers' decode, byte-exact encode")
        self._last: dict[str, Layout] = {}  # the latest scan, for group_info right after it
        self._owned: weakref.WeakKeyDictionary[Any, dict[str, Layout]] = weakref.WeakKeyDictionary()
        self._seen: dict[tuple[str, tuple[int, ...]], set[Layout]] = {}

    @property
    def implementation(self) -> str:
        from .native import describe

        return describe()

    def find_groups(self, tensors: Mapping[str, BaseTensor]) -> dict[str, list[str]]:
        """``P.weight`` -> ``[P.weight_scale_inv]`` for every FP8 weight of an FP8 checkpoint whose dense dtype
        is this backend's, the headers and the config checked (layout.scan)."""
        config = getattr(tensors, "config", None) or {}
        layouts = scan(tensors, config)
        if not layouts or model_dtype(config, tensors) != self.dense:
            return {}
        self._last = layouts
        for param, layout in layouts.items():
            self._seen.setdefault((param, layout.grid), set()).add(layout)
        return {param: [param + SCALE_SUFFIX] for param in layouts}

    def _block(self, param: str, read: Callable[[str], torch.Tensor], tiles: tuple[int, ...],
               shape: tuple[int, ...] | None = None) -> tuple[int, int]:
        """The block ``param`` is stored in: from the scan of the checkpoint ``read`` reads when that is known
        (a Checkpoint's reader), else from every scan by weight name, grid and shape, refusing an ambiguity."""
        layout = self._owned_layouts(read).get(param)
        if layout is not None and layout.grid == tiles and shape in (None, layout.shape):
            return layout.block
        blocks = {lay.block for lay in self._seen.get((param, tiles), ()) if shape in (None, lay.shape)}
        if len(blocks) != 1:
            why = "no FP8 checkpoint opened holds it" if not blocks else (
                "FP8 checkpoints opened in this process store it in different block sizes")
            raise InputError(f"cannot tell this weight's block size: {why}", tensor=param,
                             hint="read it through the adaptools.Checkpoint that holds it")
        return blocks.pop()

    def _owned_layouts(self, read: Callable[[str], torch.Tensor]) -> dict[str, Layout]:
        owner = getattr(read, "__self__", None)  # a bound reader: the checkpoint itself
        try:
            return self._owned.get(owner, {}) if owner is not None else {}
        except TypeError:  # not weakly referenceable: no scan was recorded for it
            return {}

    def group_info(self, param: str, read: Callable[[str], torch.Tensor]) -> tuple[torch.dtype, tuple[int, ...]]:
        """The model dtype and the weight's shape; only the block scales are read (and checked). Called right
        after :meth:`find_groups` on the same checkpoint, whose scan is then tied to that checkpoint's reader."""
        scale = read(param + SCALE_SUFFIX)
        check_scales(scale, param + SCALE_SUFFIX)
        owner = getattr(read, "__self__", None)
        if owner is not None and param in self._last:
            try:
                self._owned[owner] = self._last
            except TypeError:
                pass
        layout = self._last.get(param)
        if layout is None or layout.grid != tuple(scale.shape):
            shape = tuple(read(param).shape)  # not the scan just made: read the weight itself
            self._block(param, read, tuple(scale.shape), shape)
            return self.dtype, shape
        return self.dtype, layout.shape

    def decode_group(self, param: str, read: Callable[[str], torch.Tensor], names: list[str],
                     settings: Mapping[str, Any] | None = None) -> torch.Tensor:
        """The weight as transformers dequantizes it; with ``settings`` (a group just encoded with them) their
        block size, else the block of the checkpoint ``read`` reads."""
        if settings is not None and settings.get("dense"):
            return read(param).to(self.dtype)
        weight, scale = read(param), read(param + SCALE_SUFFIX)
        check_scales(scale, param + SCALE_SUFFIX)
        if settings is not None:
            block = (int(settings["block"][0]), int(settings["block"][1]))
        else:
            block = self._block(param, read, tuple(scale.shape), tuple(weight.shape))
        if weight.dtype != FP8 or weight.dim() != 2 or tuple(scale.shape) != grid(tuple(weight.shape), block):
            raise InputError(f"an FP8 weight {weight.dtype} {list(weight.shape)} with {list(scale.shape)} block "
                             "scales", tensor=param, hint=HINT)
        dense = dequantize(weight, scale, block, self.dtype)
        bad = plugin.count_nonfinite(dense)
        if bad:
            raise InputError(f"decodes to {bad} NaN or infinite value(s): NaN codes (0x7F, 0xFF), or block scales "
                             f"too large for {str(self.dtype)[6:]}", tensor=param, hint=HINT)
        return dense

    def group_settings(self, param: str, read: Callable[[str], torch.Tensor]) -> dict[str, Any]:
        """The block a weight is stored in (encoding it again uses the same)."""
        return {"block": self._block(param, read, tuple(read(param + SCALE_SUFFIX).shape))}

    def encode_group(self, param: str, dense: torch.Tensor, settings: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``P.weight`` and ``P.weight_scale_inv`` as transformers' quantizer makes them; with ``dense`` in the
        settings (a weight transformers' quantizer leaves unquantized) the weight as it is."""
        if settings.get("dense"):
            return {param: dense.clone()}  # a copy: the engine reuses the buffer it passed in
        weight, scale_inv = quantize(dense, tuple(settings["block"]), param)
        return {param: weight, param + SCALE_SUFFIX: scale_inv}

    def quantize_settings(self, tensor: BaseTensor, options: Any) -> dict[str, Any]:
        """transformers' FP8 quantizer on a dense weight: ``[128, 128]`` blocks (or the quantized base's), and
        a weight whose sizes are not multiples of the block left dense, as that quantizer leaves it."""
        block = getattr(options, "block_size", None)
        if block is None:
            if options.blocksize not in (64, 128):  # 64: the option's default, which is bitsandbytes'
                raise InputError(f"--blocksize {options.blocksize}: FP8 blocks are 128x128 here",
                                 hint="--blocksize sets bitsandbytes 4-bit blocks; leave it out for fp8")
            block = DEFAULT_BLOCK
        settings: dict[str, Any] = {"block": tuple(block)}
        if any(size % side for size, side in zip(tensor.shape, block)):
            settings["dense"] = True
        return settings

    def quantization_config(self, settings: Mapping[str, Any], options: Any) -> dict[str, Any]:
        """The quantized base's own ``quantization_config`` when there is one; else what transformers writes
        for ``FineGrainedFP8Config(modules_to_not_convert=...)``, the skip list led by ``lm_head`` (a given
        list replaces transformers' default skips, and adaptools never quantizes ``lm_head``)."""
        if isinstance(options, Fp8Options) and options.config is not None:
            return dict(options.config)
        skip = list(dict.fromkeys(["lm_head", *options.skip_modules])) if options.skip_modules else None
        return {"activation_scheme": "dynamic", "dequantize": False, "expert_dtype": "fp8",
                "modules_to_convert": None, "modules_to_not_convert": skip, "quant_method": "fp8",
                "scale_fmt": "float", "weight_block_size": list(settings.get("block", DEFAULT_BLOCK))}

    def quantize_options(self, config: Mapping[str, Any]) -> Any:
        """The options an FP8 checkpoint was made with (one backend answers for all three)."""
        quant = fp8_config({"quantization_config": config})
        if quant is None or self.dense != "BF16":
            return None
        skip = tuple(m for m in quant.get("modules_to_not_convert") or () if m != "lm_head")
        return Fp8Options(quant_type=self.name, skip_modules=skip, block_size=block_of(quant), config=dict(quant))
