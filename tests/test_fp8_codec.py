"""The fine-grained FP8 codec against transformers' own FP8 quantizer (``Fp8Quantize._quantize_one``) and
dequantizer (``Fp8Dequantize._dequantize_one``), bit for bit, partial tiles included."""

from __future__ import annotations

import pytest
import torch
from fp8_checks import FP8, build_fp8, reference_dequantize, same

import adaptools
from adaptools_plugins.fp8 import codec, native


@pytest.fixture(autouse=True, params=["native", "torch"])
def implementation(request, monkeypatch):
    """Every test twice: through the C kernel (csrc/fp8_kernels.c) and through the torch expressions."""
    if request.param == "torch":
        monkeypatch.setattr(native, "LIB", None)
    elif native.LIB is None:
        pytest.skip("the FP8 kernel is not built (no C compiler at install)")
    return request.param


def samples():
    gen = torch.Generator().manual_seed(22)
    for shape, block, dtype in [((256, 256), (128, 128), torch.bfloat16), ((384, 128), (128, 128), torch.float32),
                                ((64, 96), (32, 16), torch.float16), ((128, 256), (1, 128), torch.bfloat16),
                                ((352, 256), (128, 128), torch.bfloat16), ((256, 352), (128, 128), torch.float32),
                                ((100, 70), (32, 16), torch.float16), ((5, 3), (128, 128), torch.float32)]:
        w = torch.randn(shape, generator=gen) * 0.02
        w[: block[0], : block[1]] = 0.0  # an all-zero tile: scale 1
        w[-1, -1] = 3.0  # an outlier in the last (maybe partial) tile
        w[0, -1] = -1e-30  # a tiny value in the last column's tile
        yield w.to(dtype), block


def test_quantize_is_transformers_quantizer_byte_for_byte():
    """Whole tiles: transformers' Fp8Quantize._quantize_one as it is. Partial tiles (which it leaves dense): the
    same function on the weight padded with zeros to whole tiles, cut back."""
    for w, block in samples():
        ours = codec.quantize(w, block)
        theirs = build_fp8.quantize("x.weight", w, block)
        assert same(ours[0], theirs["x.weight"]) and same(ours[1], theirs["x.weight_scale_inv"]), (w.shape, block)
        whole = all(s % b == 0 for s, b in zip(w.shape, block))
        assert whole == (build_fp8.quantize("x.weight", w, block, partial=False)["x.weight"].dtype == FP8)


def test_the_scale_is_torchs_448_over_amax_not_the_true_quotient():
    """``448.0 / t`` in torch is reciprocal(t) · 448, two roundings; the correctly rounded quotient differs for
    a quarter of values, and transformers' bytes follow the former."""
    amax = torch.rand(100_000, generator=torch.Generator().manual_seed(1)) * 0.1 + 1e-3
    assert not torch.equal(448.0 / amax, torch.full_like(amax, 448.0) / amax)
    assert torch.equal(448.0 / amax, amax.reciprocal() * 448.0)


def test_dequantize_is_transformers_dequantizer_bit_for_bit():
    """fp32(w) · scale_inv in fp32, one rounding to the model dtype; multiplying in the model dtype (what
    transformers' backward-pass helper does) gives other bits, so the comparison can fail."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    in_dtype_differs = 0
    for w, block in samples():
        q, scale_inv = codec.quantize(w, block)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            ours = codec.dequantize(q, scale_inv, block, dtype)
            assert same(ours, reference_dequantize(q, scale_inv, block, dtype)), (w.shape, block, dtype)
        if w.shape[0] % block[0] or w.shape[1] % block[1]:
            continue
        ours = codec.dequantize(q, scale_inv, block, torch.bfloat16)
        in_dtype_differs += int(ours.ne(_dequantize_fp8_weight(q, scale_inv, list(block), torch.bfloat16)).sum())
    assert in_dtype_differs > 0


def test_requantizing_the_decoded_weight_keeps_the_codes_and_moves_scales_by_two_ulps_at_most():
    """quant(deq(q)) in fp32 gives the same fp8 codes, but a scale may move by an ulp or two (amax comes back as
    448 · scale_inv, rounded, then is inverted twice): why --requantize copies untouched weights rather than
    re-encoding them."""
    moved = 0
    for w, block in samples():
        q, scale_inv = codec.quantize(w, block)
        codes, again = codec.quantize(codec.dequantize(q, scale_inv, block, torch.float32), block)
        assert same(codes, q)
        ulps = (again.view(torch.int32) - scale_inv.view(torch.int32)).abs()
        assert int(ulps.max()) <= 2
        moved += int(ulps.sum())
    assert moved > 0


@pytest.mark.parametrize("chunk", [1, codec.CHUNK])
def test_every_code_times_every_kind_of_scale_decodes_as_transformers_does(chunk, monkeypatch):
    """All 256 codes (NaN, subnormal, ±0, 448) times scales from float32's smallest subnormal to its largest,
    across 2^120 (where the fast path's scale · 256 would overflow), in every dtype; one scale a chunk (the fast
    path where it applies) and all in one."""
    monkeypatch.setattr(codec, "CHUNK", chunk)
    codes = torch.arange(256, dtype=torch.uint8).view(FP8).repeat(16, 1)  # [16, 256]
    scales = torch.tensor([1e-45, 1e-38, 2.3e-10, 1.5e-4, 7e-3, 1.0, 3.0, 448.0, 6e4, 1e30, 2.0**119, 1.3e36,
                           2.0**120, 3e37, 1e38, 3.4e38], dtype=torch.float32).view(16, 1)
    assert codec.widened(codes[:, :127]) is not None and codec.widened(codes) is None  # NaN codes: plain path
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for width in (127, 256):  # without and with the NaN codes 0x7F and 0xFF
            ours = codec.dequantize(codes[:, :width].contiguous(), scales, (1, width), dtype)
            theirs = reference_dequantize(codes[:, :width].contiguous(), scales, (1, width), dtype)
            assert torch.equal(ours.isnan(), theirs.isnan()), dtype
            assert same(ours.nan_to_num(), theirs.nan_to_num()), (dtype, width)


def test_empty_weights():
    for shape in ((0, 5), (5, 0)):
        q, scale_inv = codec.quantize(torch.ones(shape), (128, 128))
        assert q.shape == shape and scale_inv.shape == codec.grid(shape, (128, 128))
        assert codec.dequantize(q, scale_inv, (128, 128), torch.bfloat16).shape == shape


@pytest.mark.parametrize("chunk", [1, 5000, 40_000])
def test_results_do_not_depend_on_how_many_rows_of_tiles_are_done_at_once(chunk, monkeypatch):
    expected = [(codec.quantize(w, block), w, block) for w, block in samples()]
    monkeypatch.setattr(codec, "CHUNK", chunk)
    for (q, scale_inv), w, block in expected:
        again = codec.quantize(w, block)
        assert same(again[0], q) and same(again[1], scale_inv)
        assert same(codec.dequantize(q, scale_inv, block, w.dtype), reference_dequantize(q, scale_inv, block, w.dtype))


def test_quantize_refuses_what_fp8_cannot_store():
    with pytest.raises(adaptools.InputError, match="NaN or Inf"):
        codec.quantize(torch.tensor([[1.0, float("inf")]]), (128, 128), "x.weight")
    with pytest.raises(adaptools.InputError, match="NaN or Inf"):
        codec.quantize(torch.tensor([[1.0], [float("nan")]]), (1, 128), "x.weight")
    with pytest.raises(adaptools.InputError, match="overflows"):  # transformers would write scale_inv 0 and NaNs
        codec.quantize(torch.tensor([[1e-40, 0.0]]), (128, 128), "x.weight")
    with pytest.raises(adaptools.InputError, match="2-D"):
        codec.quantize(torch.ones(3), (128, 128), "x.weight")


def test_deepseeks_convention_rounds_other_bytes_and_scales():
    """DeepSeek's own FP8 code takes ``scale_inv = amax / 448`` and divides by it; transformers (and adaptools)
    multiply by ``448 / amax`` and store its reciprocal. On bf16 Gaussian weights that stores other codes for
    about one byte in a thousand to a few in ten thousand, and other scales for about half of the tiles."""
    w = (torch.randn(1024, 1024, generator=torch.Generator().manual_seed(1)) * 0.02).to(torch.bfloat16)
    q, scale_inv = codec.quantize(w, (128, 128))
    tiles = w.float().view(8, 128, 8, 128)
    theirs_inv = tiles.abs().amax(dim=(1, 3)) / 448.0
    theirs = (tiles / theirs_inv[:, None, :, None]).clamp(-448, 448).to(FP8).view(1024, 1024)
    changed = float((theirs.view(torch.uint8) != q.view(torch.uint8)).float().mean())
    assert 0 < changed < 0.005 and 0.2 < float((theirs_inv != scale_inv).float().mean()) < 0.8


def test_rounding_to_fp8_at_and_around_every_midpoint_is_transformers_quantizer():
    """Values whose scaled products land on and around every midpoint between adjacent float8_e4m3fn values
    (ties go to even), subnormals and the clamp at ±448 included, in each input dtype: the bytes equal
    transformers' quantizer (through the kernel and through the torch expressions)."""
    grid_values = torch.arange(128, dtype=torch.uint8).view(FP8).float()[:127]  # 0 .. 448, no NaN
    mids = (grid_values[:-1] + grid_values[1:]) / 2
    scale = codec.FP8_MAX / torch.tensor(448.0)  # amax 448 in every tile: this is the scale the codec uses
    x = (mids / scale).view(-1, 1)
    nudged = torch.cat([(x.view(torch.int32) + k).view(torch.float32) for k in range(-3, 4)], dim=1).reshape(-1)
    values = torch.cat([nudged, -nudged, grid_values, torch.tensor([449.0, -1e-12, 1e-40])])
    width = 128
    body = torch.cat([values, torch.zeros((-values.numel()) % (width - 1))]).view(-1, width - 1)
    weight = torch.cat([torch.full((body.shape[0], 1), 448.0), body], dim=1)  # each tile holds 448
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w = weight.to(dtype)
        ours = codec.quantize(w, (1, width))
        theirs = build_fp8.quantize("x.weight", w, (1, width))
        assert same(ours[0], theirs["x.weight"]) and same(ours[1], theirs["x.weight_scale_inv"]), dtype
