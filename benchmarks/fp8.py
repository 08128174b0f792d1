"""Benchmark fine-grained FP8 bases: `adaptools dequantize`, dequantize-`merge` and `merge --requantize` of a
synthetic 1.1B FP8 checkpoint against `cp -r` of its dense base, and the codec against transformers' own
functions.

The dense base and the LoRA are benchmarks/merge.py's (TinyLlama-1.1B shapes, bf16, r=16 on every linear
layer, cached under --work); the FP8 base is that base quantized by `adaptools requantize --quant-type fp8`
(transformers' quantizer, byte for byte; every linear weight here is whole 128x128 tiles). Contenders run
interleaved, --repeat times each, after a warm-up `cp -r`; wall time and peak RSS (GNU time) are medians,
work time is wall time minus `python -c "import torch"` from the same run.

    python benchmarks/fp8.py                 # both parts
    python benchmarks/fp8.py --codec-only    # transformers' Fp8Quantize / Fp8Dequantize against ours
    python benchmarks/fp8.py --out DIR       # where each run writes (and deletes) its output; <work>/out by default
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from merge import SIZES, build_adapter, build_base, print_against_dense_cp, run_interleaved
from nf4 import median_time

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fixtures"))


def codec(shapes: list[tuple[int, int]]) -> None:
    """Seconds per bf16 weight: transformers' ``_quantize_one`` / ``_dequantize_one`` against ours."""
    from build_fp8 import _quantizer
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    from adaptools_plugins.fp8 import codec as ours

    print(f"{'weight':>12s} {'quantize: transformers':>23s} {'ours':>8s} {'dequantize: transformers':>25s} "
          f"{'ours':>8s}")
    for shape in shapes:
        w = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
        op = _quantizer((128, 128))
        q, scale_inv = ours.quantize(w, (128, 128))
        figures = [median_time(lambda: op._quantize_one("x.weight", w)),
                   median_time(lambda: ours.quantize(w, (128, 128))),
                   median_time(lambda: Fp8Dequantize(None)._dequantize_one(q, scale_inv, torch.bfloat16)),
                   median_time(lambda: ours.dequantize(q, scale_inv, (128, 128), torch.bfloat16))]
        print(f"{'x'.join(map(str, shape)):>12s} {figures[0]:22.3f}s {figures[1]:7.3f}s {figures[2]:24.3f}s "
              f"{figures[3]:7.3f}s")


def engine(work: Path, repeat: int, out: Path | None = None) -> None:
    cfg = SIZES["1b"]
    dense, adapter, fp8 = work / "base-1b", work / "lora-1b", work / "base-1b-fp8"
    print(f"building {dense} and {adapter} (cached) ...", file=sys.stderr)
    build_base(dense, cfg)
    build_adapter(adapter, cfg)
    adaptools_cmd = [sys.executable, "-m", "adaptools"]
    if not (fp8 / "config.json").exists():
        print(f"quantizing {dense} to {fp8} ...", file=sys.stderr)
        subprocess.run([*adaptools_cmd, "requantize", str(dense), str(fp8), "--quant-type", "fp8"], check=True,
                       stdout=subprocess.DEVNULL)
    out = out or work / "out"
    contenders = {
        "cp -r (dense base)": ["cp", "-r", str(dense), str(out)],
        "cp -r (FP8 base)": ["cp", "-r", str(fp8), str(out)],
        "adaptools dequantize": [*adaptools_cmd, "dequantize", str(fp8), str(out), "--json"],
        "adaptools merge (dequantize-merge)": [*adaptools_cmd, "merge", str(fp8), str(adapter), str(out), "--json"],
        "adaptools merge --requantize": [*adaptools_cmd, "merge", str(fp8), str(adapter), str(out), "--requantize",
                                         "--json"],
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
    }
    results, profiles = run_interleaved(contenders, out, repeat)
    sizes = {p.name: sum(f.stat().st_size for f in p.glob("*.safetensors")) / 1e9 for p in (dense, fp8)}
    print_against_dense_cp(results, profiles, f"dense base {sizes[dense.name]:.2f} GB, FP8 base "
                                              f"{sizes[fp8.name]:.2f} GB; medians of {repeat}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--codec-only", action="store_true")
    parser.add_argument("--out", type=Path, help="where each run writes its output (default <work>/out)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    codec([(4096, 4096), (5632, 2048)])
    if not args.codec_only:
        engine(args.work, args.repeat, args.out)


if __name__ == "__main__":
    main()
