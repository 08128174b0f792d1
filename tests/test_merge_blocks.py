"""The merge streams large tensors through the cache in row blocks; that must not change a single bit."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import adaptools
from adaptools import packed
from adaptools.engine.compute import NonFiniteError, apply_chain, merge_rows, row_step
from adaptools.engine.plan import MERGE, Entry
from adaptools.interfaces import BaseInfo, BaseTensor

SHAPES = [(5632, 2048, 16), (2048, 5632, 16), (4096, 4096, 64), (3072, 8192, 16), (1000, 777, 5), (40, 3000, 8)]


@pytest.fixture(params=["kernel", "torch"])
def add_kernel(request, monkeypatch):
    """Each test with the C kernel adding the delta (adaptools_packed_add) and with torch's steps."""
    if request.param == "torch":
        monkeypatch.setattr(packed, "LIB", None)
    elif packed.LIB is None:
        pytest.skip("the packed kernel is not built (no C compiler)")
    return request.param


def lora_entry(out_f: int, in_f: int, rank: int, dtype: torch.dtype, gen: torch.Generator, scale: float = 0.01):
    module = "model.layers.0.mlp.up_proj"
    tensors = {f"{module}.lora_A": torch.randn(rank, in_f, generator=gen) * scale,
               f"{module}.lora_B": torch.randn(out_f, rank, generator=gen) * scale}
    config = {"r": rank, "lora_alpha": 2 * rank, "target_modules": ["up_proj"]}
    adapter = adaptools.Adapter("lora", config, adaptools.plugin.MemoryStore(tensors))
    code = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}[dtype]
    base = BaseInfo({f"{module}.weight": BaseTensor(f"{module}.weight", code, (out_f, in_f))})
    (update,) = adaptools.plugin.get_method("lora").merge_updates(adapter, base)
    assert update.rows is not None and update.row_delta is not None
    backend = adaptools.plugin.get_backend({torch.bfloat16: "bf16", torch.float32: "fp32",
                                            torch.float16: "fp16"}[dtype])
    return update, Entry("w", MERGE, "w", (out_f, in_f), code, (update,), backend, backend)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bits, NaN payloads included."""
    view = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(view), b.view(view))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_non_finite_base_values_keep_torchs_bits(add_kernel, dtype):
    """NaN and infinities in the base are kept with torch's own bits (the kernel hands such blocks back to
    torch), and values at the edges of the dtype's range round as torch rounds them."""
    gen = torch.Generator().manual_seed(7)
    update, entry = lora_entry(300, 200, 4, dtype, gen)
    weight = (torch.randn(300, 200, generator=gen) * 0.02).to(dtype)
    info = torch.finfo(dtype)
    weight[3, :5] = torch.tensor([float("nan"), float("inf"), -float("inf"), info.max, -info.max]).to(dtype)
    weight[200, 7] = torch.tensor(float("nan")).to(dtype)
    weight[250, :3] = torch.tensor([info.tiny, -info.tiny, info.smallest_normal / 4]).to(dtype)
    whole = apply_chain([update], weight.float()).to(dtype)
    blocked = torch.empty_like(weight)
    merge_rows(entry, weight, blocked)
    assert same_bits(whole, blocked)


def test_an_overflow_the_delta_causes_is_refused(add_kernel):
    """fp16's largest values plus a large delta overflow in the cast: refused in both paths, naming the tensor."""
    gen = torch.Generator().manual_seed(8)
    update, entry = lora_entry(64, 32, 4, torch.float16, gen, scale=10.0)
    weight = torch.full((64, 32), torch.finfo(torch.float16).max, dtype=torch.float16)
    weight[::2] *= -1
    assert not bool(torch.isfinite(apply_chain([update], weight.float()).to(torch.float16)).all())
    with pytest.raises(NonFiniteError, match="non-finite"):
        merge_rows(entry, weight, torch.empty_like(weight))


@pytest.mark.parametrize(("out_f", "in_f", "rank"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_blocked_merge_is_bit_identical_to_whole_tensor(add_kernel, out_f, in_f, rank, dtype):
    gen = torch.Generator().manual_seed(out_f + in_f)
    update, entry = lora_entry(out_f, in_f, rank, dtype, gen)
    weight = (torch.randn(out_f, in_f, generator=gen) * 0.02).to(dtype)
    whole = apply_chain([update], weight.float()).to(dtype)
    blocked = torch.empty_like(weight)
    with ThreadPoolExecutor(2) as threads:
        merge_rows(entry, weight, blocked, threads, workers=2)
    assert torch.equal(whole, blocked)
    assert row_step((out_f, in_f)) % 16 == 0
