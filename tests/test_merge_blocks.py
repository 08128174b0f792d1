"""The merge streams large tensors through the cache in row blocks; that must not change a single bit."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import adaptools
from adaptools.engine.compute import apply_chain, merge_rows, row_step
from adaptools.engine.plan import MERGE, Entry
from adaptools.interfaces import BaseInfo, BaseTensor

SHAPES = [(5632, 2048, 16), (2048, 5632, 16), (4096, 4096, 64), (3072, 8192, 16), (1000, 777, 5), (40, 3000, 8)]


@pytest.mark.parametrize(("out_f", "in_f", "rank"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_blocked_merge_is_bit_identical_to_whole_tensor(out_f, in_f, rank, dtype):
    gen = torch.Generator().manual_seed(out_f + in_f)
    module = "model.layers.0.mlp.up_proj"
    tensors = {f"{module}.lora_A": torch.randn(rank, in_f, generator=gen) * 0.01,
               f"{module}.lora_B": torch.randn(out_f, rank, generator=gen) * 0.01}
    config = {"r": rank, "lora_alpha": 2 * rank, "target_modules": ["up_proj"]}
    adapter = adaptools.Adapter("lora", config, adaptools.plugin.MemoryStore(tensors))
    code = {torch.bfloat16: "BF16", torch.float32: "F32"}[dtype]
    base = BaseInfo({f"{module}.weight": BaseTensor(f"{module}.weight", code, (out_f, in_f))})
    (update,) = adaptools.plugin.get_method("lora").merge_updates(adapter, base)
    assert update.rows is not None
    weight = (torch.randn(out_f, in_f, generator=gen) * 0.02).to(dtype)
    whole = apply_chain([update], weight.float()).to(dtype)
    backend = adaptools.plugin.get_backend({torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype])
    entry = Entry("w", MERGE, "w", (out_f, in_f), code, (update,), backend, backend)
    blocked = torch.empty_like(weight)
    with ThreadPoolExecutor(2) as threads:
        merge_rows(entry, weight, blocked, threads, workers=2)
    assert torch.equal(whole, blocked)
    assert row_step((out_f, in_f)) % 16 == 0
