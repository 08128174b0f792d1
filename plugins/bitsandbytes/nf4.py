"""bitsandbytes 4-bit weights (NF4 and FP4): decode to dense and encode back, byte-identical to
bitsandbytes 0.50.2's ``quantize_4bit`` on CPU (docs/nf4.md, "Encoding").

A 4-bit parameter ``P.weight`` is stored across several tensors: the packed nibbles ``P.weight`` (U8
``[(n+1)//2, 1]``, or another dtype viewing the same bytes), ``P.weight.absmax`` (F32, or U8 codes under
double quantization), ``P.weight.quant_map``, ``P.weight.nested_absmax``, ``P.weight.nested_quant_map``
and a JSON blob ``P.weight.quant_state.bitsandbytes__nf4``. The backends here recognise such groups, so
a merge reads a 4-bit checkpoint as if it were dense.

The heavy loops run in a small C library (``csrc/nf4_kernels.c``, loaded with ctypes, the GIL released,
split over threads); without it an equivalent pure-torch path gives the same bytes, slower. Dequantization
uses flat block indices everywhere, so bitsandbytes' CPU bug for ``ncols % blocksize != 0`` never reaches
our results. On CUDA, bitsandbytes' own kernels are used.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import os
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from adaptools import plugin
from adaptools.plugin import BaseTensor, InputError

from .nf4_state import (
    BLOCKSIZES,
    DTYPE_NAMES,
    NESTED_BLOCKSIZE,
    STATE_PREFIX,
    QuantState,
    parse_state,
)

NF4_VALUES = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]
FP4_VALUES = [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]
#: bitsandbytes' argsort of the FP4 table (its two zeros sort code 0 first), nibble for each sorted slot.
FP4_ORDER = [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3]


@functools.cache
def bnb_functional() -> Any:
    """``bitsandbytes.functional``, imported quietly: on CPUs with AVX512-BF16 it logs a warning about an
    optional hub kernel package at import, which is noise for our users (we never use that kernel)."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes.functional as F

    return F


def code_table(quant_type: str) -> torch.Tensor:
    """The 16 fp32 code values, exactly as bitsandbytes builds them (list -> fp32 tensor -> / max)."""
    values = torch.tensor(NF4_VALUES if quant_type == "nf4" else FP4_VALUES)
    return values.div_(values.abs().max())


def bounds(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(15 fp32 midpoints between sorted codes, sorted slot -> nibble) as bitsandbytes' torch backend."""
    code = code_table(quant_type)
    order = torch.arange(16) if quant_type == "nf4" else torch.tensor(FP4_ORDER)
    return (code[order[:-1]] + code[order[1:]]) / 2, order.to(torch.uint8)


@functools.cache
def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map(signed=True)``; docs/nf4.md, "Double
    quantization"): for each of 7 decades, ``10^(i-6)`` times the midpoints of ``linspace(0.1, 1, 2^i + 1)``
    with both signs, then 0 and 1.0; 256 sorted fp32 values."""
    data: list[float] = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        data += ((10 ** (i - 6)) * means).tolist() + (-(10 ** (i - 6)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


@functools.cache
def _nested_lookup() -> torch.Tensor:
    """65,536-entry table from a 16-bit grid position to the dynamic-map code whose midpoint interval
    holds it: how bitsandbytes' native CPU ``quantize_blockwise`` picks codes (docs/nf4.md, "Double
    quantization")."""
    code = dynamic_map()
    grid = (-1 + 2 * torch.arange(65536, dtype=torch.float64) / 65535).float()
    return torch.bucketize(grid, (code[:-1] + code[1:]) / 2).to(torch.uint8)


def quantize_nested(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit codes and per-256-block absmax of ``values`` (fp32), byte-identical to bitsandbytes 0.50.2's
    CPU ``quantize_blockwise``: ``v = x · (1/absmax)``, grid position ``int(((v+1)·0.5)·65535 + 0.5)``,
    each step rounded in fp32; an all-zero block gets code 0."""
    n = values.numel()
    nb = -(-n // NESTED_BLOCKSIZE)
    blocks = torch.nn.functional.pad(values.reshape(-1).float(), (0, nb * NESTED_BLOCKSIZE - n)).view(nb, -1)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax).unsqueeze(1)).nan_to_num_(0.0).clamp_(-1, 1)  # 0·inf in zero blocks
    position = scaled.add_(1).mul_(0.5).mul_(65535).add_(0.5).to(torch.int64)
    codes = _nested_lookup()[position]
    codes[absmax == 0] = 0
    return codes.reshape(-1)[:n].contiguous(), absmax


#: The kernel library's interface version (``adaptools_nf4_abi`` in csrc/nf4_kernels.c).
NATIVE_ABI = 2


def _load_native(here: Path | None = None) -> Any:
    """The kernel library beside this module (or in ``here``), if one of the right interface loads."""
    lib = plugin.load_kernel(here or Path(__file__).resolve().parent, "_nf4_kernels", "adaptools_nf4", NATIVE_ABI)
    if lib is None:
        return None
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.adaptools_nf4_isa.restype = c_int
    lib.adaptools_quantize_4bit.argtypes = [ptr, c_int, i64, i64, i64, i64, ptr, ptr, ptr, ptr]
    lib.adaptools_quantize_4bit.restype = None
    lib.adaptools_dequantize_4bit.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, c_int, ptr]
    lib.adaptools_dequantize_4bit.restype = None
    return lib


NATIVE = None if os.environ.get("ADAPTOOLS_NF4_PURE_TORCH") else _load_native()


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def quantize_blocks(A: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed uint8 ``[(n+1)//2, 1]`` and fp32 absmax ``[ceil(n/bs)]``, byte-identical to bitsandbytes CPU."""
    n = A.numel()
    mid, order = bounds(quant_type)
    nb = -(-n // blocksize)
    if NATIVE is not None and A.device.type == "cpu":
        # bf16 is widened exactly inside the kernel; other dtypes are widened to fp32 here (also exact).
        src = A.reshape(-1).contiguous() if A.dtype in (torch.bfloat16, torch.float32) else A.reshape(-1).float()
        kind = 1 if src.dtype == torch.bfloat16 else 0
        packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
        absmax = torch.empty(nb, dtype=torch.float32)
        mid, order = mid.contiguous(), order.contiguous()
        plugin.split(nb, lambda b0, b1: NATIVE.adaptools_quantize_4bit(
            _ptr(src), kind, n, blocksize, b0, b1, _ptr(mid), _ptr(order), _ptr(absmax), _ptr(packed)))
        return packed.unsqueeze(1), absmax
    flat = A.reshape(-1).float().contiguous()
    # The same arithmetic in torch (bitsandbytes' default backend): reciprocal-multiply for full blocks,
    # division for the partial tail, clamp, count of midpoints strictly below (ties go lower), pack.
    rem = n % blocksize
    full = n - rem
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = blocks.abs().max(dim=-1)[0]
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        am = flat[full:].abs().max()
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am.clamp(min=1e-38), -1, 1)])
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = order.to(torch.long)[torch.bucketize(scaled, mid.to(scaled.device))].to(torch.uint8)
    return ((q[::2] << 4) | q[1::2]).unsqueeze(1), absmax


def quantize_4bit(A: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = True,
                  quant_storage: torch.dtype = torch.uint8) -> tuple[torch.Tensor, QuantState]:
    """Quantize like ``bitsandbytes.functional.quantize_4bit`` (CPU rules); returns (packed, state)."""
    if blocksize not in BLOCKSIZES:
        raise InputError(f"blocksize {blocksize} is not one of {BLOCKSIZES}")
    if quant_type not in ("nf4", "fp4"):
        raise InputError(f"quant type {quant_type!r} is not nf4 or fp4")
    if A.device.type == "cuda":
        F = bnb_functional()
        packed, state = F.quantize_4bit(A, blocksize=blocksize, quant_type=quant_type,
                                        compress_statistics=double_quant, quant_storage=quant_storage)
        return packed, _from_bnb_state(state)
    packed, absmax = quantize_blocks(A, blocksize, quant_type)
    if quant_storage != torch.uint8:
        packed = packed.squeeze(1).view(quant_storage).unsqueeze(1)
    state = QuantState(quant_type, blocksize, A.dtype, tuple(A.shape), absmax, code_table(quant_type))
    if double_quant:
        offset = mean_one_thread(absmax)
        qabsmax, nested_absmax = quantize_nested(absmax - offset)
        state.absmax, state.nested_absmax, state.nested_quant_map = qabsmax, nested_absmax, dynamic_map().clone()
        state.nested_offset = offset.item()
    return packed, state


_THREADS = threading.Lock()


def mean_one_thread(values: torch.Tensor) -> torch.Tensor:
    """``values.mean()`` summed in one thread's order. bitsandbytes takes the nested offset as
    ``absmax.mean()`` on however many threads torch has, and the sum's rounding depends on that count
    (docs/nf4.md, "The nested offset"); one thread is the order that does not depend on the machine."""
    threads = torch.get_num_threads()
    if threads == 1:
        return values.mean()
    with _THREADS:
        torch.set_num_threads(1)
        try:
            return values.mean()
        finally:
            torch.set_num_threads(threads)


def _from_bnb_state(state: Any) -> QuantState:
    nested = getattr(state, "nested", False)
    return QuantState(state.quant_type, state.blocksize, state.dtype, tuple(state.shape), state.absmax.cpu(),
                      state.code.cpu(), state.state2.absmax.cpu() if nested else None,
                      state.state2.code.cpu().clone() if nested else None,
                      state.offset.item() if nested else None)


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``code[nibble] * absmax`` in fp32 over flat blocks, then one round-to-nearest cast (docs/nf4.md, "Decoding")."""
    n = math.prod(state.shape)
    state.check(packed)  # before any kernel: they trust these sizes
    raw = packed.reshape(-1).view(torch.uint8).contiguous()
    out_dtype = dtype or state.dtype
    # Our kernel runs at bitsandbytes' speed on the CPU, and importing bitsandbytes costs 3-5 s of
    # torch.compile set-up: use bitsandbytes on CUDA or without our kernel, or once something imported it
    # anyway; and on the CPU only where its result is correct (docs/nf4.md, "Per-row absmax indexing").
    use_bnb = packed.device.type == "cuda" or NATIVE is None or "bitsandbytes.functional" in sys.modules
    if use_bnb and _bnb_dequant_is_exact(state, packed) and out_dtype == state.dtype:
        return _bnb_dequantize(packed, state)
    absmax = state.absmax_f32().contiguous()
    code = code_table(state.quant_type)
    if NATIVE is not None:
        kind = 1 if out_dtype == torch.bfloat16 else 0
        out = torch.empty(n, dtype=torch.bfloat16 if kind else torch.float32)
        nb = absmax.numel()
        plugin.split(nb, lambda b0, b1: NATIVE.adaptools_dequantize_4bit(
            _ptr(raw), _ptr(absmax), _ptr(code), n, state.blocksize, b0, b1, kind, _ptr(out)))
    else:
        nibbles = torch.stack([raw >> 4, raw & 0x0F], dim=1).reshape(-1)[:n].long()
        out = code[nibbles] * absmax.repeat_interleave(state.blocksize)[:n]
    return out.to(out_dtype).reshape(state.shape)


def _bnb_dequant_is_exact(state: QuantState, packed: torch.Tensor) -> bool:
    """bitsandbytes' native CPU dequantize (about 25 GB/s) indexes absmax per row, which is right only when
    each row holds whole blocks (docs/nf4.md, "Per-row absmax indexing"); its other CPU paths are slow.
    Use it only where exact."""
    cols = state.shape[-1] if state.shape else 0
    return (packed.device.type == "cuda" or (
        len(state.shape) == 2 and cols % state.blocksize == 0 and cols % 16 == 0 and state.blocksize < 2048
        and state.dtype in (torch.bfloat16, torch.float16, torch.float32)))


def _bnb_dequantize(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    F = bnb_functional()
    device = packed.device
    nested = None
    if state.double_quant:
        assert state.nested_absmax is not None and state.nested_quant_map is not None
        nested = F.QuantState(absmax=state.nested_absmax.to(device), code=state.nested_quant_map.to(device),
                              blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
    qs = F.QuantState(absmax=state.absmax.to(device), shape=torch.Size(state.shape), code=state.quant_map.to(device),
                      blocksize=state.blocksize, quant_type=state.quant_type, dtype=state.dtype,
                      offset=torch.tensor(state.nested_offset, device=device) if nested is not None else None,
                      state2=nested)
    out: torch.Tensor = F.dequantize_4bit(packed.reshape(-1, 1) if packed.dim() == 1 else packed, qs)
    return out


class FourBit(plugin.Backend):
    """Stored bitsandbytes 4-bit parameters of one quant type."""

    def __init__(self, quant_type: str):
        self.name = quant_type  # type: ignore[misc]
        self.quantize_default = quant_type == "nf4"  # requantize without --quant-type (transformers' default)
        self.quant_type = quant_type
        self.description = f"bitsandbytes {quant_type.upper()} 4-bit weights (decode and byte-exact encode)"  # type: ignore[misc]

    @property
    def implementation(self) -> str:
        if NATIVE is None:
            return ("torch fallback (no native kernel: quantizing is about 10x slower; reinstall with a C "
                    "compiler)")
        return f"native kernel ({'avx2' if NATIVE.adaptools_nf4_isa() == 2 else 'baseline'})"

    def find_groups(self, tensors: Mapping[str, BaseTensor]) -> dict[str, list[str]]:
        """``P.weight`` -> its companion tensors, for every parameter stored in this quant type."""
        groups = {}
        suffix = f".{STATE_PREFIX}{self.quant_type}"
        for name in tensors:
            if name.endswith(suffix):
                param = name[: -len(suffix)]
                if param in tensors:
                    groups[param] = [n for n in tensors if n.startswith(param + ".")]
        return groups

    def group_info(self, param: str, read: Callable[[str], torch.Tensor]) -> tuple[torch.dtype, tuple[int, ...]]:
        """The dense dtype and shape of a 4-bit parameter (from its JSON state; nothing big is read)."""
        name = f"{param}.{STATE_PREFIX}{self.quant_type}"
        data = parse_state(read(name), name)
        return DTYPE_NAMES[data["dtype"]], tuple(data["shape"])

    def decode_group(self, param: str, read: Callable[[str], torch.Tensor], names: list[str],
                     settings: Mapping[str, Any] | None = None) -> torch.Tensor:
        tensors = {name: read(name) for name in [param, *names]}
        state = QuantState.from_state_dict(param, tensors)
        return dequantize_4bit(tensors[param], state)

    def group_settings(self, param: str, read: Callable[[str], torch.Tensor]) -> dict[str, Any]:
        name = f"{param}.{STATE_PREFIX}{self.quant_type}"
        blob = parse_state(read(name), name)
        return {"quant_type": blob["quant_type"], "blocksize": blob["blocksize"],
                "double_quant": "nested_offset" in blob, "dtype": DTYPE_NAMES[blob["dtype"]],
                "storage": read(param).dtype}

    def encode_group(self, param: str, dense: torch.Tensor, settings: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Quantize ``dense`` (cast first to the state's dtype, so the JSON keeps e.g. bfloat16)."""
        value = dense.to(settings.get("dtype", dense.dtype))
        packed, state = quantize_4bit(value, settings.get("blocksize", 64), self.quant_type,
                                      settings.get("double_quant", True), settings.get("storage", torch.uint8))
        return state.to_state_dict(param, packed)

    def quantize_settings(self, tensor: BaseTensor, options: Any) -> dict[str, Any]:
        """transformers' settings for a dense weight: the options' blocksize and double quantization,
        the weight's own dtype as the state's dtype, uint8 storage."""
        dtype = next(t.torch for t in plugin.FLOAT_TYPES if t.code == tensor.dtype)
        return {"blocksize": options.blocksize, "double_quant": options.double_quant, "dtype": dtype,
                "storage": torch.uint8}

    def quantize_options(self, config: Mapping[str, Any]) -> Any:
        """The options a transformers bitsandbytes 4-bit checkpoint of this quant type was made with."""
        if (config.get("quant_method") != "bitsandbytes" or not config.get("load_in_4bit")
                or config.get("bnb_4bit_quant_type", "nf4") != self.quant_type):
            return None
        return plugin.QuantizeOptions(quant_type=self.quant_type,
                                         double_quant=bool(config.get("bnb_4bit_use_double_quant")),
                                         skip_modules=tuple(config.get("llm_int8_skip_modules") or ()))

    def quantization_config(self, settings: Mapping[str, Any], options: Any) -> dict[str, Any]:
        """The ``quantization_config`` block transformers writes for a bitsandbytes 4-bit model."""
        compute = str(settings["dtype"]).removeprefix("torch.")
        skip = list(options.skip_modules) or None
        return {"_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": compute,
                "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": self.quant_type,
                "bnb_4bit_use_double_quant": options.double_quant, "llm_int8_enable_fp32_cpu_offload": False,
                "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": skip,
                "llm_int8_threshold": 6.0, "load_in_4bit": True, "load_in_8bit": False,
                "quant_method": "bitsandbytes"}
