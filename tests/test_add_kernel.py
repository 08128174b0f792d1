"""The merge's add-and-round kernel (adaptools_packed_add in adaptools/csrc/packed_kernels.c) against torch's
``(base.float() + delta).to(dtype)``, bit for bit wherever the result is finite, for every pair of dtypes, with
its count of non-finite results equal to torch's (the engine redoes such blocks in torch)."""

from __future__ import annotations

import pytest
import torch

from adaptools import packed

pytestmark = pytest.mark.skipif(packed.LIB is None, reason="the packed kernel is not built (no C compiler)")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def values(gen: torch.Generator, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Random values of many magnitudes, and each dtype's edges: largest, smallest normal and subnormal."""
    x = torch.randn(n, generator=gen) * torch.pow(2.0, torch.randint(-30, 30, (n,), generator=gen).float())
    info = torch.finfo(dtype)
    edges = torch.tensor([info.max, -info.max, info.tiny, info.smallest_normal / 2, 0.0, -0.0, 1.0])
    x[: edges.numel()] = edges
    return x.to(dtype)


@pytest.mark.parametrize("base_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("special", [False, True])
def test_add_rounded_is_torchs_add_and_cast(base_dtype, out_dtype, special):
    gen = torch.Generator().manual_seed(hash((str(base_dtype), str(out_dtype), special)) % 2**31)
    n = 100_003  # not a multiple of any vector width
    base = values(gen, n, base_dtype)
    delta = values(gen, n, torch.float32) * 2.0**-8
    delta[-50:] = torch.finfo(torch.float32).max  # with the base's largest value: overflows in float32 or the cast
    base[-50:] = torch.finfo(base_dtype).max
    if special:
        base[10:13] = torch.tensor([float("nan"), float("inf"), -float("inf")]).to(base_dtype)
        delta[20:22] = torch.tensor([float("nan"), -float("inf")])
    ours = torch.empty(n, dtype=out_dtype)
    bad = packed.add_rounded(base, delta, ours)
    theirs = (base.float() + delta).to(out_dtype)
    finite = torch.isfinite(theirs)
    assert bad == int((~finite).sum()) and bad > 0
    view = {2: torch.int16, 4: torch.int32}[ours.element_size()]
    assert torch.equal(ours[finite].view(view), theirs[finite].view(view))


def test_add_rounded_refuses_mismatched_tensors():
    with pytest.raises(ValueError, match="contiguous"):
        packed.add_rounded(torch.zeros(4, 4).t(), torch.zeros(4, 4), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="float32"):
        packed.add_rounded(torch.zeros(4), torch.zeros(4, dtype=torch.float16), torch.zeros(4))
