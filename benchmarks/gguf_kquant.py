"""Benchmark the K-quant and IQ4 codecs and a merge into a Q4_K_M (or IQ4_XS) GGUF base.

Two parts, each with its baseline measured in the same run:

- codec: every K-quant type and IQ4_NL/IQ4_XS encoded by the numpy code (plugins/gguf/kquants.py, iq4.py)
  and by the native kernel (plugins/gguf/csrc/gguf_kquants*.c, gguf_iq4.c) on the same float32 tensor, and
  decoded by gguf-py and by the kernel: MB/s of float32 values (medians of --repeat) and native / numpy. The
  two encoders' bytes are compared too.
- merge: ``adaptools merge BASE.gguf ADAPTER OUT.gguf`` against ``cp`` of the base, interleaved, medians of
  --repeat, with the engine's profile. The base (built once, cached under --work) is a synthetic Llama with
  TinyLlama-1.1B's shapes in llama-quantize's Q4_K_M layout: every linear weight and the embedding Q4_K,
  ``output.weight`` Q6_K, and ``attn_v`` and ``ffn_down`` Q6_K in the layers llama.cpp's ``use_more_bits``
  picks (the first and last eighth of the layers and every third between; docs/gguf.md, "The native
  codec"), norms F32, written with our encoders. The adapter is benchmarks/merge.py's r=16 LoRA on every
  linear layer, so every linear weight is decoded, merged and re-encoded in its own type. ``--layout iq4_xs``:
  every linear weight and the embedding IQ4_XS, ``output.weight`` Q6_K, instead.

    python benchmarks/gguf_kquant.py                  # both parts, 3 repeats
    python benchmarks/gguf_kquant.py --skip-merge     # the codec table only (a minute)
    python benchmarks/gguf_kquant.py --json results.json
    python benchmarks/gguf_kquant.py --skip-codec --llama-quantize PATH/llama-quantize   # llama.cpp for scale
    python benchmarks/gguf_kquant.py --skip-codec --layout iq4_xs --work /tmp/w   # outputs under /tmp/w

Set ADAPTOOLS_GGUF_PURE_PYTHON=1 to time the merge with the numpy codecs instead (the codec part always
times both).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gguf_merge  # noqa: E402  (the GGUF merge benchmark's timer)
import merge as dense  # noqa: E402  (the dense benchmark's shapes, adapter and interleaving)

KQUANTS = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
CODEC_TYPES = [*KQUANTS, Q.IQ4_NL, Q.IQ4_XS]


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the layers whose ``attn_v`` and ``ffn_down`` get more bits in Q4_K_M."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def q4_k_m_type(name: str, n_layers: int) -> Q:
    """The type llama-quantize gives a 2-D tensor of a Llama in Q4_K_M (without an importance matrix)."""
    if name == "output.weight":
        return Q.Q6_K
    if name.startswith("blk.") and (name.endswith(".attn_v.weight") or name.endswith(".ffn_down.weight")):
        return Q.Q6_K if use_more_bits(int(name.split(".")[1]), n_layers) else Q.Q4_K
    return Q.Q4_K


def iq4_xs_type(name: str, n_layers: int) -> Q:
    """The --layout iq4_xs base's types: IQ4_XS but ``output.weight`` (Q6_K)."""
    return Q.Q6_K if name == "output.weight" else Q.IQ4_XS


LAYOUTS = {"q4_k_m": (q4_k_m_type, gguf.LlamaFileType.MOSTLY_Q4_K_M),
           "iq4_xs": (iq4_xs_type, gguf.LlamaFileType.MOSTLY_IQ4_XS)}


def build_base(path: Path, cfg: dict, layout: str = "q4_k_m") -> dict[str, int]:
    """The synthetic checkpoint of benchmarks/merge.py's shapes as one GGUF file in ``layout`` (the pattern of
    benchmarks/gguf_merge.py's Q8_0 base), each tensor encoded by adaptools' codec; returns the count of
    tensors by type."""
    from adaptools_plugins.gguf import arch as gguf_arch
    from adaptools_plugins.gguf import codec

    model = gguf_arch.ModelShape(gguf_arch.family_for_arch("llama"), n_blocks=cfg["num_hidden_layers"])
    tensors = [(model.gguf_name(name), shape) for name, shape in dense.shapes(cfg)]
    type_of, ftype = LAYOUTS[layout]
    types = {name: Q.F32 if len(shape) == 1 else type_of(name, cfg["num_hidden_layers"]) for name, shape in tensors}
    counts: dict[str, int] = {}
    for qtype in types.values():
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    if path.exists():
        return counts
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf_merge.synthetic_writer(tmp, cfg, f"synthetic TinyLlama-1.1B shapes, {layout.upper()} layout",
                                         ftype)
    for name, shape in tensors:
        if types[name] == Q.F32:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), 4 * shape[0])
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, types[name])
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                                   raw_dtype=types[name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    gen = torch.Generator().manual_seed(0)
    for name, shape in tensors:
        if types[name] == Q.F32:
            writer.write_tensor_data(np.ones(shape, dtype=np.float32))
        else:
            values = torch.randn(shape, generator=gen).mul_(0.02).numpy()
            writer.write_tensor_data(codec.encode(values, types[name]))
    writer.close()
    tmp.rename(path)
    return counts


def _median_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def codec_table(shape: tuple[int, int], repeat: int) -> dict[str, dict[str, float]]:
    """Encode and decode MB/s (of float32 values) for each K-quant, the Python code against the kernel."""
    from adaptools_plugins.gguf import iq4, kquants, native

    if native.LIB is None:
        raise SystemExit("the GGUF kernel is not loaded (ADAPTOOLS_GGUF_PURE_PYTHON set, or no C compiler)")
    values = (np.random.default_rng(0).standard_normal(shape) * 0.02).astype(np.float32)
    mb = values.nbytes / 1e6
    table: dict[str, dict[str, float]] = {}
    print(f"\ncodec, a {shape[0]}x{shape[1]} float32 tensor ({mb:.1f} MB), {native.describe()}; "
          f"medians of {repeat}, MB/s of float32 values")
    print(f"{'type':6s} {'enc numpy':>10s} {'enc native':>11s} {'x':>6s} {'dec gguf-py':>12s} {'dec native':>11s} "
          f"{'x':>6s}  same bytes")
    for qtype in CODEC_TYPES:
        python = kquants.quantize if qtype in KQUANTS else iq4.quantize
        data = native.encode(values, qtype)
        same = bool(np.array_equal(data, python(values, qtype.name)))
        row = {
            "encode_numpy": mb / _median_seconds(lambda q=qtype: python(values, q.name), repeat),
            "encode_native": mb / _median_seconds(lambda q=qtype: native.encode(values, q), repeat),
            "decode_gguf_py": mb / _median_seconds(lambda q=qtype: gguf.quants.dequantize(data, q), repeat),
            "decode_native": mb / _median_seconds(lambda q=qtype: native.decode(data, q, shape), repeat),
            "same_bytes": same,
        }
        table[qtype.name] = row
        print(f"{qtype.name:6s} {row['encode_numpy']:10.1f} {row['encode_native']:11.1f} "
              f"{row['encode_native'] / row['encode_numpy']:6.1f} {row['decode_gguf_py']:12.1f} "
              f"{row['decode_native']:11.1f} {row['decode_native'] / row['decode_gguf_py']:6.1f}  {same}")
    return table


def merge_table(work: Path, repeat: int, llama_quantize: Path | None = None, layout: str = "q4_k_m") -> dict:
    cfg = dense.SIZES["1b"]
    work.mkdir(parents=True, exist_ok=True)
    base, adapter = work / f"base-1b-{layout}.gguf", work / "lora-1b"
    print(f"building {base} and {adapter} (cached) ...", file=sys.stderr)
    counts = build_base(base, cfg, layout)
    dense.build_adapter(adapter, cfg)
    out = work / "out.gguf"
    adaptools_cmd = [sys.executable, "-m", "adaptools"]
    contenders = {
        f"cp ({layout.upper()} base)": ["cp", str(base), str(out)],
        f"adaptools merge ({layout.upper()})": [*adaptools_cmd, "merge", str(base), str(adapter), str(out), "--json"],
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
    }
    if llama_quantize is not None:  # llama.cpp's own K-quant encoders on the same types, for scale
        q8 = work / "base-1b-q8_0.gguf"
        gguf_merge.build_base(q8, cfg)
        contenders[f"llama-quantize Q8_0 -> {layout.upper()}"] = [
            str(llama_quantize), "--allow-requantize", str(q8), str(out), layout.upper(), str(os.cpu_count() or 1)]
    results, profiles = dense.run_interleaved(contenders, out, repeat, gguf_merge.measure)  # cp first: warm cache
    cp = results[f"cp ({layout.upper()} base)"]["wall_s"]
    torch_s = results['python -c "import torch"']["wall_s"]
    print(f"\nbase: {base.stat().st_size / 1e9:.2f} GB, tensors {counts}; r=16 LoRA on every linear layer; "
          f"medians of {repeat}")
    print(f"{'contender':30s} {'wall s':>8s} {'x cp':>8s} {'work s':>8s} {'work x cp':>10s} {'peak RSS GiB':>13s}")
    for name, r in results.items():
        work_s = r["wall_s"] - torch_s if name.startswith("adaptools") else r["wall_s"]
        r["work_s"] = work_s
        print(f"{name:30s} {r['wall_s']:8.2f} {r['wall_s'] / cp:8.2f} {work_s:8.2f} {work_s / cp:10.2f} "
              f"{r['peak_rss_bytes'] / 2**30:13.2f}")
    for name, runs in profiles.items():
        if runs:
            median = {k: statistics.median(p.get(k, 0.0) for p in runs) for k in runs[0]}
            results[name]["profile"] = median
            parts = ", ".join(f"{k} {median[k]:.2f}" for k in ("plan", "read", "compute", "encode",
                                                              "write_background", "finalize") if k in median)
            print(f"  {name}: {parts} (seconds, medians)")
    return {"bytes": base.stat().st_size, "tensor_types": counts, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("benchmarks/.work"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--shape", type=int, nargs=2, default=(2048, 2048), help="the codec part's tensor")
    parser.add_argument("--skip-codec", action="store_true")
    parser.add_argument("--skip-merge", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="q4_k_m", help="the merge part's base")
    parser.add_argument("--llama-quantize", type=Path, help="also time this llama-quantize binary requantizing the "
                        "Q8_0 base of gguf_merge.py to Q4_K_M on every core (fixtures/llamacpp_tools.py builds it)")
    args = parser.parse_args()
    report: dict = {}
    if not args.skip_codec:
        report["codec"] = codec_table(tuple(args.shape), args.repeat)
    if not args.skip_merge:
        report["merge"] = merge_table(args.work, args.repeat, args.llama_quantize, args.layout)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
