"""``--imatrix FILE``: llama.cpp importance matrices (plugins/gguf/imatrix.py) and the weighted encoders
(plugins/gguf/csrc/gguf_imatrix.c); docs/gguf.md, "Importance matrices".

Fast: both file layouts read to the same weights llama-quantize computes from them (sums over call or token
counts; a zero token count gives ones); every hostile file is refused in one line, exit 2; a merge with
--imatrix keeps each K-quant type, changes the bytes of the weighted tensors only, encodes a tensor without
an entry exactly as without --imatrix (and names it), and is refused for outputs that do not weight by one.

Slow (llamacpp): bytes identical to llama.cpp's own ``ggml_quantize_chunk`` given the same weights, per type,
on rows with outliers, zeros, subnormals and the largest magnitudes; and a merge into a Q4_K_M base made by
llama.cpp equals ``llama-quantize --imatrix`` of the exact merge, tensor for tensor, in both file layouts.
"""

from __future__ import annotations

import ctypes
import json
import struct
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import FIXTURES
from gguf import GGMLQuantizationType as Q
from gguf_bases import llama_cpp_quantized, raw
from test_gguf_kquants import hard_rows, varied_rows, wide  # noqa: F401  (wide: the module's Q4_K base)

from adaptools.plugin import InputError
from adaptools_plugins.gguf import codec as gguf_codec
from adaptools_plugins.gguf import imatrix, native

WEIGHTED = [Q.Q4_K, Q.Q6_K, Q.Q5_K, Q.Q3_K, Q.Q2_K, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]
CHANGED = ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.ffn_down.weight")


def write_gguf_imatrix(path: Path, entries: dict[str, tuple[np.ndarray, np.ndarray]], *, metadata: bool = True,
                       counts_type: Q = Q.F32) -> Path:
    """An imatrix in llama-imatrix's GGUF layout: per entry ``<name>.in_sum2`` [experts, columns] and
    ``<name>.counts`` [experts, 1], with the metadata llama-quantize requires."""
    writer = gguf.GGUFWriter(path, "llama")  # llama-imatrix writes no architecture; the loaders ignore it
    writer.add_type("imatrix")
    if metadata:
        writer.add_array("imatrix.datasets", ["test.txt"])
        writer.add_uint32("imatrix.chunk_count", 4)
        writer.add_uint32("imatrix.chunk_size", 512)
    for name, (sums, counts) in entries.items():
        sums = np.asarray(sums, np.float32)
        writer.add_tensor(f"{name}.in_sum2", sums.reshape(len(counts), -1) if sums.size % len(counts) == 0 else sums)
        c = np.asarray(counts, np.float32).reshape(-1, 1)
        writer.add_tensor(f"{name}.counts", c.astype(np.float16) if counts_type == Q.F16 else c)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def legacy_bytes(entries: dict[str, tuple[int, np.ndarray]], trailer: bool = True) -> bytes:
    """An imatrix in the older binary layout."""
    out = struct.pack("<i", len(entries))
    for name, (ncall, sums) in entries.items():
        encoded = name.encode()
        out += struct.pack("<i", len(encoded)) + encoded + struct.pack("<ii", ncall, len(sums))
        out += np.asarray(sums, "<f4").tobytes()
    if trailer:
        out += struct.pack("<i", 4) + struct.pack("<i", 8) + b"test.txt"
    return out


def positive(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random(n) ** 4 * 10).astype(np.float32)


def entries_for(shapes: dict[str, int], seed: int = 5) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {name: (positive(cols, seed + i) * 37, np.array([37.0])) for i, (name, cols) in enumerate(shapes.items())}


# --- reading ---------------------------------------------------------------------------------------------------


def test_both_layouts_give_llama_quantizes_weights(tmp_path):
    sums = positive(512, 1).reshape(2, 256)
    path = write_gguf_imatrix(tmp_path / "m.gguf", {"blk.0.ffn_gate_exps.weight": (sums, np.array([10.4, 0.0])),
                                                     "blk.0.attn_q.weight": (sums[:1], np.array([2.5]))})
    weights = imatrix.load(path).weights
    # the sums over each expert's token count rounded half away from zero; a count of 0 gives ones
    np.testing.assert_array_equal(weights["blk.0.ffn_gate_exps.weight"][:256], sums[0] / np.float32(10))
    np.testing.assert_array_equal(weights["blk.0.ffn_gate_exps.weight"][256:], np.ones(256, np.float32))
    np.testing.assert_array_equal(weights["blk.0.attn_q.weight"], sums[0] / np.float32(3))
    legacy = tmp_path / "m.dat"
    legacy.write_bytes(legacy_bytes({"blk.0.attn_q.weight": (3, sums[0]), "output.weight": (0, sums[1])}))
    weights = imatrix.load(legacy).weights
    np.testing.assert_array_equal(weights["blk.0.attn_q.weight"], sums[0] / np.float32(3))
    np.testing.assert_array_equal(weights["output.weight"], sums[1])  # a call count of 0: the sums as stored
    legacy.write_bytes(legacy_bytes({"output.weight": (1, sums[1])}, trailer=False))  # the trailer is optional
    np.testing.assert_array_equal(imatrix.load(legacy).weights["output.weight"], sums[1])


def test_weights_fit_a_tensor_or_are_refused(tmp_path):
    path = write_gguf_imatrix(tmp_path / "m.gguf", {"a.weight": (positive(256, 1), np.array([1.0])),
                                                     "exps.weight": (positive(512, 2), np.array([1.0, 2.0])),
                                                     "token_embd.weight": (positive(128, 3), np.array([1.0]))})
    m = imatrix.load(path)
    assert m.for_tensor("a.weight", (64, 256)).shape == (1, 256)
    assert m.for_tensor("exps.weight", (2, 64, 256)).shape == (2, 256)
    assert m.for_tensor("missing.weight", (64, 256)) is None
    assert m.for_tensor("token_embd.weight", (64, 256)) is None  # llama-quantize encodes it without weights
    for name, shape in (("a.weight", (64, 512)), ("exps.weight", (64, 256)), ("exps.weight", (4, 64, 256))):
        with pytest.raises(InputError, match="columns") as err:
            m.for_tensor(name, shape)
        assert "another model" in str(err.value) and name in str(err.value)


def hostile_gguf(tmp_path: Path, case: str) -> Path:
    good = positive(256, 1)
    if case == "no-metadata":
        return write_gguf_imatrix(tmp_path / "x.gguf", {"a.weight": (good, np.array([1.0]))}, metadata=False)
    if case == "nan":
        bad = good.copy()
        bad[7] = np.nan
        return write_gguf_imatrix(tmp_path / "x.gguf", {"a.weight": (bad, np.array([1.0]))})
    if case == "inf-after-division":
        bad = good.copy()
        bad[3] = 3e38
        return write_gguf_imatrix(tmp_path / "x.gguf", {"a.weight": (bad, np.array([0.4]))})  # rounds to 0: ones
    if case == "negative":
        return write_gguf_imatrix(tmp_path / "x.gguf", {"a.weight": (-good, np.array([1.0]))})
    if case == "negative-count":
        return write_gguf_imatrix(tmp_path / "x.gguf", {"a.weight": (good, np.array([-3.0]))})
    if case == "experts-do-not-split":
        return write_gguf_imatrix(tmp_path / "x.gguf", {"a.weight": (np.concatenate([good, good[:1]]),
                                                                       np.array([1.0, 1.0, 1.0]))})
    if case == "f16-counts":
        return write_gguf_imatrix(tmp_path / "x.gguf", {"a.weight": (good, np.array([1.0]))}, counts_type=Q.F16)
    writer = gguf.GGUFWriter(tmp_path / "x.gguf", "llama")
    writer.add_array("imatrix.datasets", ["t"])
    writer.add_uint32("imatrix.chunk_count", 1)
    writer.add_uint32("imatrix.chunk_size", 1)
    if case == "sums-without-counts":
        writer.add_tensor("a.weight.in_sum2", good)
    elif case == "no-entries":
        writer.add_tensor("a.weight", good)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tmp_path / "x.gguf"


@pytest.mark.parametrize("case,message", [
    ("no-metadata", "without the imatrix metadata"), ("nan", "NaN or infinite"), ("negative", "negative value"),
    ("negative-count", "token count"), ("experts-do-not-split", "do not split"), ("f16-counts", "not F32"),
    ("sums-without-counts", ".counts is missing"), ("no-entries", "no .in_sum2"),
])
def test_a_hostile_gguf_imatrix_is_refused_in_one_line(tmp_path, case, message):
    path = hostile_gguf(tmp_path, case)
    with pytest.raises(InputError, match=message.replace(".", r"\.")) as err:
        imatrix.load(path)
    assert "\n" not in str(err.value) and str(path.name) in str(err.value)


def test_a_count_of_zero_makes_even_non_finite_sums_ones(tmp_path):
    """llama-quantize replaces an expert with no tokens by ones before it checks for non-finite values."""
    path = hostile_gguf(tmp_path, "inf-after-division")
    np.testing.assert_array_equal(imatrix.load(path).weights["a.weight"], np.ones(256, np.float32))


def test_every_truncation_of_a_legacy_file_is_refused(tmp_path):
    whole = legacy_bytes({"blk.0.attn_q.weight": (3, positive(64, 1)), "output.weight": (2, positive(32, 2))},
                         trailer=False)
    path = tmp_path / "m.dat"
    for cut in range(0, len(whole), 7):
        path.write_bytes(whole[:cut])
        with pytest.raises(InputError, match="not a readable imatrix file") as err:
            imatrix.load(path)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("blob,message", [
    (struct.pack("<i", 0), "0 entries"),
    (struct.pack("<i", -5), "-5 entries"),
    (struct.pack("<ii", 1, 1 << 30), "name of"),
    (struct.pack("<ii", 1, 3) + b"abc" + struct.pack("<ii", 1, 0), "0 values"),
    (struct.pack("<ii", 1, 3) + b"abc" + struct.pack("<ii", -1, 1) + b"\0\0\0\0", "call count"),
    (struct.pack("<ii", 1, 2) + b"\xff\xfe" + struct.pack("<ii", 1, 1) + b"\0\0\0\0", "not UTF-8"),
    (struct.pack("<i", 2) + legacy_bytes({"a": (1, [1.0])}, trailer=False)[4:] * 2, "stored twice"),
    (legacy_bytes({"a": (1, [np.nan])}), "NaN or infinite"),
    (legacy_bytes({"a": (1, [-1.0])}), "negative value"),
])
def test_a_hostile_legacy_imatrix_is_refused_in_one_line(tmp_path, blob, message):
    path = tmp_path / "m.dat"
    path.write_bytes(blob)
    with pytest.raises(InputError, match=message) as err:
        imatrix.load(path)
    assert "\n" not in str(err.value)


def test_a_missing_file_is_refused(tmp_path):
    with pytest.raises(InputError, match="cannot read the imatrix file"):
        imatrix.load(tmp_path / "absent.dat")


# --- the weighted encoders -------------------------------------------------------------------------------------


needs_native = pytest.mark.skipif(native.LIB is None, reason="the weighted encoders are in the native kernel only")


@needs_native
@pytest.mark.parametrize("qtype", WEIGHTED, ids=lambda q: q.name)
def test_weights_change_the_fit_where_they_should(qtype):
    """The weighted encoding decodes within the type's rounding, differs from the unweighted one, and
    fits heavily weighted columns better than lightly weighted ones."""
    rng = np.random.default_rng(4)
    values = rng.standard_normal((32, 512)).astype(np.float32)
    weights = np.where(np.arange(512) % 2 == 0, 100.0, 0.01).astype(np.float32)
    weighted = gguf_codec.encode(values, qtype, weights)
    assert weighted.shape == gguf_codec.encode(values, qtype).shape
    assert not np.array_equal(weighted, gguf_codec.encode(values, qtype))
    error = np.abs(gguf_codec.decode_bytes(weighted.reshape(-1), qtype, values.shape) - values)
    assert error[:, 0::2].mean() < error[:, 1::2].mean()
    # one vector per expert: each expert's rows encoded with its own weights
    experts = np.stack([weights, weights[::-1]])
    stacked = gguf_codec.encode(values.reshape(2, 16, 512), qtype, experts)
    np.testing.assert_array_equal(stacked[1], gguf_codec.encode(values[16:], qtype, weights[::-1]))


@needs_native
def test_q8_0_and_float_types_ignore_weights():
    values = np.random.default_rng(2).standard_normal((4, 256)).astype(np.float32)
    for qtype in (Q.Q8_0, Q.F16, Q.F32):
        np.testing.assert_array_equal(gguf_codec.encode(values, qtype, np.ones(256, np.float32)),
                                      gguf_codec.encode(values, qtype))


# --- merging with --imatrix ------------------------------------------------------------------------------------


@pytest.fixture()
def matrix(tmp_path):
    return write_gguf_imatrix(tmp_path / "imatrix.gguf", entries_for(
        {"blk.0.attn_q.weight": 256, "blk.0.attn_k.weight": 256, "blk.0.ffn_down.weight": 512}))


@needs_native
def test_a_merge_with_an_imatrix_weights_the_changed_tensors(wide, matrix, tmp_path, cli_runner):  # noqa: F811
    plain = cli_runner("merge", wide["base"], wide["lora"], tmp_path / "plain.gguf")
    assert plain.exit_code == 0, plain.output
    result = cli_runner("merge", wide["base"], wide["lora"], tmp_path / "out.gguf", "--imatrix", matrix, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["warnings"] == []
    before, unweighted, weighted = raw(wide["base"]), raw(tmp_path / "plain.gguf"), raw(tmp_path / "out.gguf")
    assert sorted(n for n in weighted if weighted[n] != before[n]) == sorted(CHANGED)
    for name in CHANGED:
        assert weighted[name][0] == Q.Q4_K and weighted[name][1] != unweighted[name][1]
    # the bytes are the weighted encoder's on the merged values (decoded from an F32 merge of the same inputs)
    f32 = cli_runner("merge", wide["base"], wide["lora"], tmp_path / "f32.gguf", "--outtype", "f32")
    assert f32.exit_code == 0, f32.output
    reader = gguf.GGUFReader(tmp_path / "f32.gguf")
    weights = imatrix.load(matrix)
    for t in reader.tensors:
        if t.name in CHANGED:
            values = gguf_codec.decode(t)
            want = native.encode_weighted(values, Q.Q4_K, weights.for_tensor(t.name, values.shape))
            assert weighted[t.name][1] == want.tobytes(), t.name


@needs_native
def test_a_tensor_without_an_entry_is_encoded_as_without_the_imatrix(wide, tmp_path, cli_runner):  # noqa: F811
    path = write_gguf_imatrix(tmp_path / "partial.gguf", entries_for({"blk.0.attn_q.weight": 256}))
    plain = cli_runner("merge", wide["base"], wide["lora"], tmp_path / "plain.gguf")
    result = cli_runner("merge", wide["base"], wide["lora"], tmp_path / "out.gguf", "--imatrix", path)
    assert plain.exit_code == 0 and result.exit_code == 0, result.output
    unweighted, weighted = raw(tmp_path / "plain.gguf"), raw(tmp_path / "out.gguf")
    assert weighted["blk.0.attn_q.weight"] != unweighted["blk.0.attn_q.weight"]
    for name in ("blk.0.attn_k.weight", "blk.0.ffn_down.weight"):
        assert weighted[name] == unweighted[name]
    warning = [line for line in result.stderr.splitlines() if "no usable entry" in line]
    assert len(warning) == 1 and "blk.0.attn_k.weight" in warning[0] and "2 changed" in warning[0], result.stderr


@needs_native
@pytest.mark.parametrize("entries,message", [
    ({"blk.9.attn_q.weight": 256, "other.weight": 64}, "no entry of the imatrix names a tensor of this base"),
    ({"blk.0.attn_q.weight": 512}, "has 512 values, but the tensor has 256 columns"),
])
def test_an_imatrix_for_another_model_is_refused(wide, tmp_path, cli_runner, entries, message):  # noqa: F811
    path = write_gguf_imatrix(tmp_path / "other.gguf", entries_for(entries))
    result = cli_runner("merge", wide["base"], wide["lora"], tmp_path / "out.gguf", "--imatrix", path)
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "out.gguf").exists()


def test_imatrix_is_refused_where_it_cannot_apply(wide, matrix, tmp_path, cli_runner, monkeypatch):  # noqa: F811
    folder = cli_runner("merge", wide["hf"], wide["lora"], tmp_path / "out", "--imatrix", matrix)
    assert folder.exit_code == 2 and "GGUF outputs only" in folder.output, folder.output
    dense = cli_runner("merge", wide["hf"], wide["lora"], tmp_path / "out.gguf", "--imatrix", matrix)
    assert dense.exit_code == 2 and "applies to a merge into a GGUF base" in dense.output, dense.output
    hostile = tmp_path / "bad.dat"
    hostile.write_bytes(b"\1\0\0\0\5\0")
    bad = cli_runner("merge", wide["base"], wide["lora"], tmp_path / "out.gguf", "--imatrix", hostile)
    assert bad.exit_code == 2 and "bad.dat" in bad.output and "not a readable imatrix" in bad.output, bad.output
    monkeypatch.setattr(native, "LIB", None)
    pure = cli_runner("merge", wide["base"], wide["lora"], tmp_path / "out.gguf", "--imatrix", matrix)
    assert pure.exit_code == 2 and "needs adaptools' native GGUF kernel" in pure.output, pure.output
    assert not any((tmp_path / n).exists() for n in ("out", "out.gguf"))


# --- slow: llama.cpp itself ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ggml_base():
    """llama.cpp's own libggml-base (the full llama.cpp fixture): ``ggml_quantize_chunk`` takes an imatrix."""
    sys.path.insert(0, str(FIXTURES))
    import llamacpp

    llamacpp.python()  # built the first time
    built = sorted(llamacpp.VENV.glob("lib/python*/site-packages/**/libggml-base.so"))
    lib = ctypes.CDLL(str(built[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def ggml_bytes(lib, values: np.ndarray, qtype: Q, weights: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's bytes for ``values`` in ``qtype``, weighted by ``weights`` (an imatrix row) when given."""
    values = np.ascontiguousarray(values, np.float32)
    rows, cols = values.shape
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    out = np.zeros(rows * cols // block * size, np.uint8)
    lib.ggml_quantize_chunk(int(qtype), values.ctypes.data, out.ctypes.data, 0, rows, cols,
                            None if weights is None else np.ascontiguousarray(weights, np.float32).ctypes.data)
    return out.reshape(rows, -1)


def weight_kinds() -> dict[str, np.ndarray]:
    """512 importance weights of six kinds for the byte-identity tests: random, zeros, ones, spiky (with zeros),
    tiny (1e-30) and huge (a quarter of float32's largest)."""
    rng = np.random.default_rng(17)
    f32max = np.finfo(np.float32).max
    kinds = {"random": rng.random(512).astype(np.float32) * 3, "zeros": np.zeros(512, np.float32),
             "ones": np.ones(512, np.float32), "spiky": (rng.random(512) ** 8 * 1e4).astype(np.float32),
             "tiny": np.full(512, 1e-30, np.float32), "huge": np.full(512, f32max / 4, np.float32)}
    kinds["spiky"][::50] = 0
    return kinds


@pytest.mark.slow
@pytest.mark.llamacpp
@needs_native
@pytest.mark.parametrize("qtype", WEIGHTED, ids=lambda q: q.name)
def test_bytes_equal_llama_cpps_weighted_quantizer(qtype, ggml_base):
    kinds = weight_kinds()
    rows = {"hard": hard_rows().reshape(-1, 512), "varied": varied_rows(n=40).reshape(-1, 512)}
    if gguf.GGML_QUANT_SIZES[qtype][0] == 32:  # 11 blocks a row: 8 fit side by side, then 3 one at a time
        rows["tail"] = np.ascontiguousarray(varied_rows(n=40).reshape(-1, 256)[:, :32 * 11])
    for row_name, values in rows.items():
        for kind, full in kinds.items():
            weights = np.ascontiguousarray(full[:values.shape[1]])
            want = ggml_bytes(ggml_base, values, qtype, weights)
            with np.errstate(all="ignore"):
                ours = native.encode_weighted(values, qtype, weights)
            bad = np.nonzero((ours != want).any(axis=1))[0]
            assert not len(bad), f"{row_name} rows, {kind} weights: {len(bad)} of {len(want)} rows differ"


@pytest.mark.slow
@pytest.mark.llamacpp
@needs_native
@pytest.mark.parametrize("layout", ["gguf", "legacy"])
def test_a_merge_equals_llama_quantize_with_the_same_imatrix(layout, tmp_path, cli_runner):
    """A tiny Llama quantized to Q4_K_M by llama.cpp (Q4_K and Q6_K tensors), merged with --imatrix: every
    changed tensor is the bytes ``llama-quantize --imatrix`` makes of the exact merge (the same merge with
    --outtype f32), in both file layouts; one weight has no entry (encoded without weights on both sides),
    and one entry has a token count of zero (weights of ones on both sides)."""
    import subprocess

    sys.path.insert(0, str(FIXTURES))
    import llamacpp_tools

    base, _ = llama_cpp_quantized(tmp_path, "q4_k_m", 11)
    # one entry per 2-D weight but blk.1.ffn_up (left out); blk.0.attn_v's token count is zero
    shapes = {t.name: int(t.shape[0]) for t in gguf.GGUFReader(base).tensors if len(t.shape) == 2}
    names = sorted(n for n in shapes if n != "blk.1.ffn_up.weight")
    rng = np.random.default_rng(3)
    counts = {n: (0.0 if n == "blk.0.attn_v.weight" else float(rng.integers(50, 500))) for n in names}
    sums = {n: (rng.random(shapes[n]) ** 3 * 20 * max(counts[n], 1)).astype(np.float32) for n in names}
    if layout == "gguf":
        matrix = write_gguf_imatrix(tmp_path / "imatrix.gguf",
                                    {n: (sums[n], np.array([counts[n]])) for n in names})
    else:  # the legacy file stores mean squares times the call count, and has no zero-token case
        matrix = tmp_path / "imatrix.dat"
        matrix.write_bytes(legacy_bytes({n: (int(counts[n]), sums[n] / np.float32(max(counts[n], 1)) * 7)
                                         for n in names if counts[n]}))
    out, exact, ref = tmp_path / "out.gguf", tmp_path / "exact.gguf", tmp_path / "ref.gguf"
    result = cli_runner("merge", base, tmp_path / "lora", out, "--imatrix", matrix, "--json")
    assert result.exit_code == 0, result.output
    assert cli_runner("merge", base, tmp_path / "lora", exact, "--outtype", "f32").exit_code == 0
    done = subprocess.run([str(llamacpp_tools.tool("llama-quantize")), "--allow-requantize", "--imatrix",
                           str(matrix), str(exact), str(ref), "Q4_K_M", "2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    before, got, want = raw(base), raw(out), raw(ref)
    changed = [n for n in got if got[n] != before[n]]
    assert len(changed) == 14 and {got[n][0] for n in changed} == {Q.Q4_K, Q.Q6_K}
    for name in changed:
        assert got[name][0] == want[name][0] and got[name] == want[name], name
    plain = cli_runner("merge", base, tmp_path / "lora", tmp_path / "plain.gguf")
    assert plain.exit_code == 0
    unweighted = raw(tmp_path / "plain.gguf")
    assert got["blk.1.ffn_up.weight"] == unweighted["blk.1.ffn_up.weight"]  # no entry: no weights
    assert sum(got[n] != unweighted[n] for n in changed) >= 12
