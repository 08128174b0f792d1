"""The survival report's C sums (adaptools/csrc/norms.c) against the torch implementation they replace
(``quantized.distances``, still the fallback) and against float64 arithmetic, on random and hostile values:
every dtype the kernel widens, NaN and infinity (the report must give torch's NaN/infinity and never crash),
sums that overflow float32, sizes not a multiple of any vector width, and the changed-byte count against
``torch.count_nonzero``."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from adaptools.engine import quantized

pytestmark = pytest.mark.skipif(quantized.NORMS is None, reason="the packed kernel is not built (no C compiler)")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def values(gen: torch.Generator, n: int, dtype: torch.dtype, spread: int = 8) -> torch.Tensor:
    """Random values of many magnitudes (within what each dtype holds)."""
    x = torch.randn(n, generator=gen) * torch.pow(2.0, torch.randint(-spread, spread, (n,), generator=gen).float())
    return x.to(dtype)


def torch_norms(merged: torch.Tensor, base: torch.Tensor, requantized: torch.Tensor) -> list[float]:
    """What the report computed before the kernel (and computes without it)."""
    return quantized.distances([(merged, base), (requantized, base), (requantized, merged)])


def exact_norms(merged: torch.Tensor, base: torch.Tensor, requantized: torch.Tensor) -> list[float]:
    """The kernel's definition in float64: each difference rounded to float32, squared and summed in float64."""
    m, b, r = merged.float(), base.float(), requantized.float()
    return [float((x - y).double().square().sum().sqrt()) for x, y in ((m, b), (r, b), (r, m))]


@pytest.mark.parametrize("merged_dtype", DTYPES)
@pytest.mark.parametrize("base_dtype", DTYPES)
@pytest.mark.parametrize("requantized_dtype", DTYPES)
def test_norms_match_torch_and_float64(merged_dtype, base_dtype, requantized_dtype):
    gen = torch.Generator().manual_seed(hash((str(merged_dtype), str(base_dtype), str(requantized_dtype))) % 2**31)
    n = 300_007  # more than one of torch's 2^18 chunks and not a multiple of any vector width
    base = values(gen, n, base_dtype)
    merged = (base.float() + values(gen, n, torch.float32) * 1e-3).to(merged_dtype)
    requantized = (merged.float() + values(gen, n, torch.float32) * 1e-4).to(requantized_dtype)
    ours = quantized.survival_norms(merged, base, requantized)
    assert ours == pytest.approx(torch_norms(merged, base, requantized), rel=1e-5)
    assert ours == pytest.approx(exact_norms(merged, base, requantized), rel=1e-12)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 511, 512, 513, 4099])
def test_small_and_odd_sizes(n):
    gen = torch.Generator().manual_seed(n)
    merged, base, requantized = (values(gen, n, torch.float32) for _ in range(3))
    ours = quantized.survival_norms(merged, base, requantized)
    assert ours == pytest.approx(exact_norms(merged, base, requantized), rel=1e-12)
    assert ours == pytest.approx(torch_norms(merged, base, requantized), rel=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where", ["merged", "base", "requantized"])
@pytest.mark.parametrize("special", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_infinity_give_torchs_report(dtype, where, special):
    """A NaN or infinity anywhere: each norm is NaN or infinite exactly where torch's is, and survival()
    reports (never raises)."""
    gen = torch.Generator().manual_seed(3)
    n = 20_011
    tensors = {k: values(gen, n, dtype) for k in ("merged", "base", "requantized")}
    tensors[where][[0, 9_999, n - 1]] = special
    ours = quantized.survival_norms(tensors["merged"], tensors["base"], tensors["requantized"])
    theirs = torch_norms(tensors["merged"], tensors["base"], tensors["requantized"])
    for a, b in zip(ours, theirs, strict=True):
        assert (math.isnan(a), math.isinf(a)) == (math.isnan(b), math.isinf(b))
        if math.isfinite(b):
            assert a == pytest.approx(b, rel=1e-5)
    codes = tensors["requantized"].view(torch.uint8)
    report = quantized.survival("w", codes, tensors["merged"], tensors["base"], {"w": codes.clone()},
                                tensors["requantized"])
    assert report.codes_changed == 0.0 and report.tensor == "w"


def test_differences_beyond_float32_squares():
    """Differences near float32's largest value: the difference itself overflows to infinity as in torch;
    a difference whose square passes float32's range still has a finite float64 norm (torch's fp32 dot says
    infinity there: the kernel is the more exact of the two, never the less)."""
    big = torch.tensor([3e38, 1e20, 1.0, -3e38], dtype=torch.float32)
    zero = torch.zeros(4)
    ours = quantized.survival_norms(big, zero, -big)
    assert ours == pytest.approx(exact_norms(big, zero, -big), rel=1e-12)
    assert math.isinf(ours[2])  # 3e38 - (-3e38) overflows float32 in both
    moderate = torch.tensor([1e20, 2e20], dtype=torch.float32)
    ours = quantized.survival_norms(moderate, torch.zeros(2), torch.zeros(2))
    assert math.isinf(torch_norms(moderate, torch.zeros(2), torch.zeros(2))[0])
    assert ours[0] == pytest.approx(math.hypot(1e20, 2e20), rel=1e-6)


def test_other_layouts_take_the_torch_path():
    """float64, non-contiguous or mismatched tensors are not the kernel's: torch computes the same report."""
    gen = torch.Generator().manual_seed(5)
    a, b, c = (values(gen, 64 * 33, torch.float32).view(64, 33) for _ in range(3))
    for args in ((a.double(), b, c), (a.t(), b.t(), c.t()), (a[:, :32], b[:, :32], c[:, :32])):
        assert quantized.survival_norms(*args) == tuple(torch_norms(*args))


@pytest.mark.parametrize("n", [0, 1, 4095, 4096, 4097, 3 * 4096 + 17, 1_000_003])
def test_changed_share_counts_what_torch_counts(n):
    gen = torch.Generator().manual_seed(n)
    old = torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8)
    new = old.clone()
    flip = torch.rand(n, generator=gen) < 0.3
    new[flip] ^= torch.randint(1, 256, (int(flip.sum()),), generator=gen, dtype=torch.uint8)
    expected = int(torch.count_nonzero(old != new)) / max(1, n)
    assert quantized.changed_share(old, new) == expected
    assert quantized.changed_share(old, old.clone()) == 0.0
    if n:
        assert quantized.changed_share(old, ~old) == 1.0


def test_changed_share_views_any_dtype_as_bytes():
    """The codes may be stored as int8, int32 or float16: the share is of their bytes."""
    gen = torch.Generator().manual_seed(9)
    words = torch.randint(-2**31, 2**31 - 1, (10_100,), generator=gen, dtype=torch.int32)
    changed = words.clone()
    changed[::3] += 1
    expected = int(torch.count_nonzero(words.view(torch.uint8) != changed.view(torch.uint8))) / (4 * words.numel())
    assert quantized.changed_share(words.view(101, 100), changed.view(101, 100)) == expected
    assert quantized.changed_share(words, changed[:-1]) == 1.0  # sizes differ: everything changed


def test_pure_torch_switch_turns_the_kernel_off():
    env = {**os.environ, "ADAPTOOLS_PACKED_PURE_TORCH": "1"}
    code = "from adaptools.engine import quantized; print(quantized.NORMS is None)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
