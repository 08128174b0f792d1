"""The packed-integer kernel (adaptools/csrc/packed_kernels.c) against each family's torch decoder, bit for bit, on
random shapes, code widths, packing orders, group indices (act-order g_idx included), zero-point conventions and
scale dtypes, and on scales that are subnormal, huge, zero, negative, infinite or NaN. The torch decoders are the
ones proved against AutoAWQ, GPTQModel and compressed-tensors (test_awq.py, test_gptq_oracle.py,
test_compressed_tensors.py), so equal bits carry those proofs over to the kernel."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from adaptools import packed, plugin
from adaptools_plugins.awq import codec as awq
from adaptools_plugins.compressed_tensors import codec as ct
from adaptools_plugins.compressed_tensors.layout import Layout, Scheme
from adaptools_plugins.gptq import codec as gptq

pytestmark = pytest.mark.skipif(packed.LIB is None, reason="the packed kernel is not built (no C compiler)")

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SPECIAL = (0.0, -0.0, -1.5, 1e-40, 6e-8, 3e4, 1e38, float("inf"), float("-inf"), float("nan"))


def torch_path(fn, *args):
    """``fn(*args)`` with the kernel turned off: the family's torch decoder."""
    lib, packed.LIB = packed.LIB, None
    try:
        assert not plugin.packed_available()
        return fn(*args)
    finally:
        packed.LIB = lib


def same_bits(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Equal dtype, shape and bits; NaN counts as equal to NaN (a NaN's payload is not data, and every backend
    refuses a weight holding one before it is written)."""
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    nan = torch.isnan(ours)
    assert torch.equal(nan, torch.isnan(theirs))
    view = {2: torch.int16, 4: torch.int32}[ours.element_size()]
    assert torch.equal(ours[~nan].view(view), theirs[~nan].view(view))


def words(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int32, generator=generator)


def scales_of(generator: torch.Generator, shape: tuple[int, int], dtype: torch.dtype, special: bool) -> torch.Tensor:
    values = torch.rand(shape, generator=generator) * 0.02 + 1e-4
    if special:
        flat = values.view(-1)
        picks = torch.randint(0, flat.numel(), (min(flat.numel(), 3 * len(SPECIAL)),), generator=generator)
        flat[picks] = torch.tensor(SPECIAL * 3)[: picks.numel()]
    return values.to(dtype)


FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(seed=st.integers(0, 2**31), words_out=st.integers(1, 9), group=st.sampled_from([8, 16, 32, 128]),
       groups=st.integers(1, 4), special=st.booleans())
def test_awq_kernel_is_the_torch_decoder(seed, words_out, group, groups, special):
    g = torch.Generator().manual_seed(seed)
    inputs, outputs = group * groups, 8 * words_out
    qweight, qzeros = words(g, inputs, words_out), words(g, groups, words_out)
    scales = scales_of(g, (groups, outputs), torch.float16, special)
    same_bits(awq.dequantize(qweight, qzeros, scales, group),
              torch_path(awq.dequantize, qweight, qzeros, scales, group))


@FAST
@given(seed=st.integers(0, 2**31), bits=st.sampled_from([2, 3, 4, 8]), blocks=st.integers(1, 5),
       outputs=st.integers(1, 70), groups=st.integers(1, 5), v1=st.booleans(), act_order=st.booleans(),
       dtype=st.sampled_from(DTYPES), special=st.booleans())
def test_gptq_kernel_is_the_torch_decoder(seed, bits, blocks, outputs, groups, v1, act_order, dtype, special):
    g = torch.Generator().manual_seed(seed)
    inputs = 32 * blocks  # a whole number of words for every width (3-bit: 32 codes in three words)
    qweight = words(g, inputs * bits // 32, outputs)
    zero_codes = torch.randint(0, 1 << bits, (groups, outputs), generator=g, dtype=torch.int32)
    zeros = (zero_codes + 1) & ((1 << bits) - 1) if v1 else zero_codes  # what zero_points gives for each format
    if act_order:
        g_idx = torch.randint(0, groups, (inputs,), generator=g, dtype=torch.int32)
    else:
        g_idx = (torch.arange(inputs) * groups // inputs).to(torch.int32)
    scales = scales_of(g, (groups, outputs), dtype, special)
    same_bits(gptq.dequantize(qweight, zeros, scales, g_idx, bits),
              torch_path(gptq.dequantize, qweight, zeros, scales, g_idx, bits))


@FAST
@given(seed=st.integers(0, 2**31), bits=st.sampled_from([4, 8]), rows=st.integers(1, 40),
       groups=st.integers(1, 6), group=st.sampled_from([8, 16, 32, 128]),
       strategy=st.sampled_from(["group", "channel"]),
       symmetric=st.booleans(), dtype=st.sampled_from(DTYPES), special=st.booleans())
def test_compressed_tensors_kernel_is_the_torch_decoder(seed, bits, rows, groups, group, strategy, symmetric, dtype,
                                                         special):
    g = torch.Generator().manual_seed(seed)
    cols = group * groups
    scheme = Scheme("pack-quantized", bits, "int", strategy, symmetric, group if strategy == "group" else 0)
    layout = Layout(scheme, (rows, cols), "", ())
    weight = words(g, rows, -(-cols * bits // 32))
    n_scales = groups if strategy == "group" else 1
    scale = scales_of(g, (rows, n_scales), dtype, special)
    zero = None
    if not symmetric:  # stored as the library packs them: unsigned codes along the rows, 2^(bits-1) above
        codes = torch.randint(0, 1 << bits, (rows, n_scales), generator=g, dtype=torch.int32)
        zero = ct_pack_rows(codes, bits)
    same_bits(ct.dequantize(layout, weight, scale, zero, dtype),
              torch_path(ct.dequantize, layout, weight, scale, zero, dtype))


@FAST
@given(seed=st.integers(0, 2**31), rows=st.integers(1, 300), cols=st.integers(1, 300),
       strategy=st.sampled_from(["tensor", "channel", "group", "block"]), group=st.sampled_from([8, 16, 32]),
       block=st.sampled_from([(1, 1), (7, 5), (128, 128), (16, 300)]), dtype=st.sampled_from(DTYPES),
       special=st.booleans())
def test_compressed_tensors_fp8_kernel_is_the_torch_decoder(seed, rows, cols, strategy, group, block, dtype,
                                                             special):
    """Every one of the 256 fp8 codes (NaN included) times scales of each dtype, tiles partial at the edges."""
    g = torch.Generator().manual_seed(seed)
    if strategy == "group":
        cols = group * -(-cols // group)
    scheme = Scheme("float-quantized", 8, "float", strategy, True, group if strategy == "group" else 0,
                    block if strategy == "block" else (0, 0))
    layout = Layout(scheme, (rows, cols), "", ())
    weight = torch.randint(0, 256, (rows, cols), generator=g, dtype=torch.uint8).view(torch.float8_e4m3fn)
    grid = {"tensor": (1, 1), "channel": (rows, 1), "group": (rows, cols // group),
            "block": (-(-rows // block[0]), -(-cols // block[1]))}[strategy]
    scale = scales_of(g, grid, dtype, special).reshape((1,) if strategy == "tensor" else grid)
    scale = scale * torch.tensor(2.0, dtype=dtype) ** torch.randint(-20, 20, grid, generator=g).to(dtype).reshape(
        scale.shape)  # 16-bit scales of many magnitudes: products near each dtype's subnormal and overflow edges
    same_bits(ct.dequantize(layout, weight, scale, None, dtype),
              torch_path(ct.dequantize, layout, weight, scale, None, dtype))


def test_the_fp8_kernel_refuses_a_scale_grid_of_the_wrong_shape():
    codes = torch.zeros((4, 6), dtype=torch.uint8).view(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="scale grid"):
        plugin.dequantize_fp8(codes, torch.ones(2, 2), (2, 2), torch.float32)  # 6 columns of 2: 3 tiles a row


def ct_pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero-point codes ``[rows, groups]`` packed along the rows (column j of ``[groups, rows]`` words), the
    layout codec.zero_points reads back."""
    per = 32 // bits
    flat = codes.t().to(torch.int64)  # [groups, rows]
    padded = torch.nn.functional.pad(flat, (0, -flat.shape[1] % per))
    shifts = torch.arange(per, dtype=torch.int64) * bits
    packed_words = (padded.reshape(flat.shape[0], -1, per) << shifts).sum(-1) & 0xFFFFFFFF
    packed_words = torch.where(packed_words >= 1 << 31, packed_words - (1 << 32), packed_words).to(torch.int32)
    return packed_words.t().contiguous()


def test_ct_zero_points_round_trip_through_the_test_packer():
    """The test's zero-point packer is the layout codec.zero_points reads (else the asymmetric case above would
    test nothing)."""
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (37, 3), generator=g, dtype=torch.int32)
    scheme = Scheme("pack-quantized", 4, "int", "group", False, 8)
    assert torch.equal(ct.zero_points(ct_pack_rows(codes, 4), scheme, (37, 24)), codes - 8)


def test_the_kernel_refuses_what_would_read_outside_its_tensors():
    g = torch.Generator().manual_seed(1)
    scales = torch.ones(4, 2)
    with pytest.raises(ValueError, match="cannot hold"):
        packed.dequantize_packed(words(g, 4, 1), 4, (4, 16), scales, torch.zeros(16, dtype=torch.int64), torch.float32)
    with pytest.raises(ValueError, match="index"):
        packed.dequantize_packed(words(g, 4, 2), 4, (4, 16), scales, torch.full((16,), 2), torch.float32)
    with pytest.raises(ValueError, match="fields"):
        packed.dequantize_packed(words(g, 4, 2), 4, (4, 16), scales, torch.zeros(16, dtype=torch.int64),
                                 torch.float32, fields=[0, 1, 2, 3, 4, 5, 6, 6])


def unpack_stream(stream_words: torch.Tensor, bits: int, count: int, fields: list[int] | None) -> torch.Tensor:
    """``[n, w]`` int32 words, each row a stream -> ``[n, count]`` codes, in torch (dequantize_packed's layout)."""
    per = 32 // bits if 32 % bits == 0 else 0
    wide = torch.cat([stream_words.to(torch.int64) & 0xFFFFFFFF,
                      torch.zeros(stream_words.shape[0], 1, dtype=torch.int64)], dim=1)
    p = torch.arange(count)
    if per:
        word, shift = p // per, bits * torch.tensor(fields or list(range(per)))[p % per]
    else:
        word, shift = (p * bits) // 32, (p * bits) % 32
    both = wide[:, word] | (wide[:, word + 1] << 32)
    return (both >> shift) & ((1 << bits) - 1)


def path(bits: int, along: int, cols: int, group: int, pattern: str, dtype: torch.dtype) -> dict:
    return {"seed": 5, "bits": bits, "along": along, "rows": 17, "cols": cols, "group": group, "pattern": pattern,
            "zeros": True, "shuffled": True, "dtype": dtype, "special": True}


@FAST
# every path each run, whatever hypothesis draws: table with extract-and-look-up fused (AWQ: 4 bits down the rows,
# 16-bit results), table after a codes pass (float32 results; codes along columns, GPTQ's and CT's; 3 bits
# crossing words), a few alternating groups (the table's group search), per value (act-order scatter, 8 bits)
@example(**path(4, 0, 1000, 128, "runs", torch.float16))
@example(**path(4, 0, 1537, 32, "runs", torch.bfloat16))
@example(**path(4, 0, 1000, 128, "runs", torch.float32))
@example(**path(4, 1, 1537, 128, "runs", torch.float16))
@example(**path(3, 0, 1000, 128, "runs", torch.bfloat16))
@example(**path(3, 1, 1000, 128, "runs", torch.float32))
@example(**path(2, 1, 513, 600, "few", torch.float16))
@example(**path(4, 1, 1000, 128, "many", torch.float16))
@example(**path(8, 0, 1000, 128, "runs", torch.float16))
@given(seed=st.integers(0, 2**31), bits=st.integers(1, 8), along=st.sampled_from([0, 1]), rows=st.integers(1, 24),
       cols=st.sampled_from([1, 7, 64, 511, 512, 513, 1000, 1537]), group=st.sampled_from([1, 8, 32, 128, 600]),
       pattern=st.sampled_from(["runs", "few", "many"]), zeros=st.booleans(), shuffled=st.booleans(),
       dtype=st.sampled_from(DTYPES), special=st.booleans())
def test_the_kernel_is_the_torch_expression(seed, bits, along, rows, cols, group, pattern, zeros, shuffled, dtype,
                                            special):
    """Both ways to a value (a per-row table of results where a tile of columns uses few groups, else each
    value computed) give the bits of ``((code - zero) * scale).to(dtype)``: contiguous groups, a few groups
    alternating (the table's group search), an act-order-like scatter (per value), tiles of 512 columns with
    a partial last one, every width (3 bits crossing words), codes along either axis, shuffled fields."""
    g = torch.Generator().manual_seed(seed)
    groups = -(-cols // group)
    if pattern == "runs":
        index = torch.arange(cols) // group
    elif pattern == "few":
        index = torch.randint(0, min(groups, 2), (cols,), generator=g)
    else:
        index = torch.randint(0, groups, (cols,), generator=g)
    per = 32 // bits if 32 % bits == 0 else 0
    fields = torch.randperm(per, generator=g).tolist() if per and shuffled else None
    stream = cols if along == 1 else rows
    stored = words(g, rows if along == 1 else cols, -(-stream * bits // 32))
    codes = unpack_stream(stored, bits, stream, fields)
    if along == 0:
        codes, stored = codes.t(), stored.t()
    scale = scales_of(g, (rows, groups), dtype, special)
    zero = torch.randint(0, 1 << bits, (rows, groups), generator=g).to(torch.float32) if zeros else None
    offset = float(1 << (bits - 1))
    got = packed.dequantize_packed(stored, bits, (rows, cols), scale, index, dtype, along=along, fields=fields,
                                   zeros=zero, offset=offset)
    subtract = torch.gather(zero, 1, index.expand(rows, cols)) if zero is not None else offset
    want = ((codes.to(torch.float32) - subtract) * torch.gather(scale.float(), 1, index.expand(rows, cols)))
    same_bits(got, want.to(dtype))


@pytest.fixture(scope="module")
def baseline_lib(tmp_path_factory):
    """The kernel built for the baseline instruction set only (target_clones turned into a no-op attribute), as a
    machine without AVX2 runs it."""
    import shutil
    import subprocess
    import sysconfig
    from pathlib import Path
    if shutil.which("gcc") is None:
        pytest.skip("no gcc to build a baseline-only kernel")
    folder = tmp_path_factory.mktemp("baseline")
    source = Path(packed.__file__).parent / "csrc"
    target = folder / f"_packed_kernels{sysconfig.get_config_var('EXT_SUFFIX')}"
    subprocess.run(["gcc", "-O3", "-fno-fast-math", "-ffp-contract=off", "-fno-trapping-math", "-shared", "-fPIC",
                    "-Dtarget_clones(...)=unused", f"-I{source}", str(source / "packed_kernels.c"), "-o", str(target)],
                   check=True)
    lib = packed._load(folder)
    assert lib is not None and lib.adaptools_packed_isa() in (1, 2)
    return lib


@pytest.mark.parametrize("case", [path(4, 0, 1000, 128, "runs", torch.float16), path(4, 1, 1537, 32, "runs",
                                  torch.bfloat16), path(3, 0, 1000, 128, "runs", torch.float32),
                                  path(2, 1, 513, 600, "few", torch.float16), path(8, 1, 1000, 128, "many",
                                  torch.bfloat16)])
def test_the_baseline_build_gives_the_same_bytes(baseline_lib, case):
    """Every path of a build without AVX2 gives the bytes of this build (and so of the torch expression)."""
    g = torch.Generator().manual_seed(case["seed"])
    bits, cols, rows = case["bits"], case["cols"], case["rows"]
    index = torch.arange(cols) // case["group"] if case["pattern"] == "runs" else \
        torch.randint(0, 2 if case["pattern"] == "few" else -(-cols // case["group"]), (cols,), generator=g)
    groups = int(index.max()) + 1
    stored = words(g, rows, -(-cols * bits // 32)) if case["along"] else words(g, -(-rows * bits // 32), cols)
    scale = scales_of(g, (rows, groups), case["dtype"], True)
    zero = torch.randint(0, 1 << bits, (rows, groups), generator=g).to(torch.float32)

    def decode():
        return packed.dequantize_packed(stored, bits, (rows, cols), scale, index, case["dtype"], along=case["along"],
                                        zeros=zero)

    ours = decode()
    lib, packed.LIB = packed.LIB, baseline_lib
    try:
        theirs = decode()
    finally:
        packed.LIB = lib
    view = torch.int32 if case["dtype"] == torch.float32 else torch.int16
    assert torch.equal(ours.view(view), theirs.view(view))
