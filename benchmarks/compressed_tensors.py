"""Benchmark the compressed-tensors decoder against the library's own per-module ``decompress``: seconds and
peak RSS to decode one weight, each contender in a fresh process (so that RSS is its own), for an int4
asymmetric group-32 weight (pack-quantized), an fp8 channel weight and an NVFP4 weight.

    python benchmarks/compressed_tensors.py [--rows 8192 --cols 8192 --repeat 3]

This is the measurement behind plugins/compressed_tensors/codec.py's choice to decode without the library.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys, time, torch
kind, who, rows, cols, path = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.manual_seed(0)
if who != "make":
    rows = cols = 64  # the weight comes from the file: keep this process's set-up small
started = time.perf_counter()
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationScheme
from compressed_tensors.quantization.quant_scheme import NVFP4
imported = time.perf_counter() - started
w = (torch.randn(rows, cols) * 0.02).to(torch.bfloat16)
if kind == "pack":
    scheme = QuantizationScheme(targets=["Linear"], weights=dict(num_bits=4, strategy="group", group_size=32,
                                                                  symmetric=False), format="pack-quantized")
    g = w.reshape(rows, cols // 32, 32)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    scale = ((hi - lo) / 15).clamp(min=1e-6)
    zero = torch.round(torch.clamp(-8 - lo / scale, -8, 7)).to(torch.int8)
    state = {"weight": w, "weight_scale": scale, "weight_zero_point": zero}
elif kind == "fp8":
    scheme = QuantizationScheme(targets=["Linear"], weights=dict(num_bits=8, type="float", strategy="channel"),
                                format="float-quantized")
    scale = (w.abs().amax(1, keepdim=True) / 448).clamp(min=1e-6)
    state = {"weight": w, "weight_scale": scale, "weight_zero_point": torch.zeros_like(scale)}
else:
    scheme = QuantizationScheme(targets=["Linear"], format="nvfp4-pack-quantized", **NVFP4)
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam
    glob = generate_gparam(w.amin(), w.amax())
    g = w.reshape(rows, cols // 16, 16)
    scale, _ = calculate_qparams(g.amin(-1), g.amax(-1), scheme.weights, global_scale=glob)
    state = {"weight": w, "weight_scale": scale, "weight_global_scale": glob}
compressor = BaseCompressor.get_value_from_registry(scheme.format)
if who == "make":  # the compressed weight, written once; the decoders load only it, so RSS is their own
    from safetensors.torch import save_file
    save_file(compressor.compress(state, scheme), path)
    sys.exit(0)
del w, state
from safetensors.torch import load_file
stored = load_file(path)
base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if who == "library":
    started = time.perf_counter()
    out = compressor.decompress(stored, scheme)["weight"]
else:
    from adaptools_plugins.compressed_tensors import codec
    from adaptools_plugins.compressed_tensors.layout import Layout, Scheme
    started = time.perf_counter()
    if kind == "nvfp4":
        out = codec.dequantize_nvfp4(stored["weight_packed"], stored["weight_scale"], stored["weight_global_scale"])
    else:
        s = Scheme("pack-quantized", 4, "int", "group", False, 32) if kind == "pack" else Scheme(
            "float-quantized", 8, "float", "channel")
        layout = Layout(s, tuple(stored["weight_shape"].tolist()) if kind == "pack" else tuple(
            stored["weight"].shape), "BF16", ())
        out = codec.dequantize(layout, stored.get("weight_packed", stored.get("weight")), stored["weight_scale"],
                               stored.get("weight_zero_point"), torch.bfloat16)
seconds = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "extra_rss_mib": (peak - base_rss) / 1024, "import_s": imported,
                  "dense_mib": out.numel() * 2 / 2**20}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--cols", type=int, default=8192)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"{args.rows}x{args.cols} bf16 weight; medians of {args.repeat} fresh processes")
    print(f"{'format':8s} {'decoder':8s} {'seconds':>8s} {'peak RSS above the stored weight, MiB':>38s}")
    work = Path(tempfile.mkdtemp())
    for kind in ("pack", "fp8", "nvfp4"):
        path = str(work / f"{kind}.safetensors")
        command = [sys.executable, "-c", CHILD, kind, "make", str(args.rows), str(args.cols), path]
        subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
        for who in ("library", "ours"):
            command[4] = who
            runs = [json.loads(subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT).stdout)
                    for _ in range(args.repeat)]
            seconds = statistics.median(r["seconds"] for r in runs)
            rss = statistics.median(r["extra_rss_mib"] for r in runs)
            print(f"{kind:8s} {who:8s} {seconds:8.3f} {rss:38.0f}   (dense result {runs[0]['dense_mib']:.0f} MiB)")
    print(f"importing compressed_tensors: {runs[0]['import_s']:.2f} s")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
