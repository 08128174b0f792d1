"""Benchmark the AWQ decoder against AutoAWQ's own ``dequantize_gemm`` (docs/awq.md, "Speed and memory").

One random AWQ GEMM linear (random words, random positive fp16 scales), decoded to the dense fp16 ``[out, in]``
weight by each contender in a fresh process (so that peak RSS is its own): adaptools in this venv, AutoAWQ in
its venv (fixtures/awq_oracle.py builds it on first use). Prints seconds, peak RSS above the inputs, and
whether the two results are bit-identical.

    python benchmarks/awq_decode.py [--inputs 4096 --outputs 11008 --group 128]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fixtures"))

CHILD = r"""
import resource, sys, time, torch
which, inputs, outputs, group, out = sys.argv[1], *map(int, sys.argv[2:5]), sys.argv[5]
gen = torch.Generator().manual_seed(0)
qweight = torch.randint(-(1 << 31), (1 << 31) - 1, (inputs, outputs // 8), dtype=torch.int32, generator=gen)
qzeros = torch.randint(-(1 << 31), (1 << 31) - 1, (inputs // group, outputs // 8), dtype=torch.int32, generator=gen)
scales = (torch.rand(inputs // group, outputs, generator=gen) * 0.01 + 1e-4).to(torch.float16)
if which == "autoawq":
    sys.path.insert(0, sys.argv[6])
    import awq_oracle
    packing, _ = awq_oracle._load_awq()
else:
    from adaptools_plugins.awq import codec
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
if which == "autoawq":
    weight = packing.dequantize_gemm(qweight, qzeros, scales, 4, group).t().contiguous()
else:
    weight = codec.dequantize(qweight, qzeros, scales, group)
seconds = time.perf_counter() - started
peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
print(f"{which:9s} {seconds:6.2f} s  peak RSS above inputs {peak:5.0f} MiB  (output {weight.numel() * 2 >> 20} MiB)")
torch.save(weight, out)
"""


def main() -> None:
    import awq_oracle
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=4096)
    parser.add_argument("--outputs", type=int, default=11008)
    parser.add_argument("--group", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for which, python in (("adaptools", Path(sys.executable)), ("autoawq", awq_oracle.venv_python())):
            out = Path(tmp) / f"{which}.pt"
            subprocess.run([str(python), "-W", "ignore", "-c", CHILD, which, str(args.inputs), str(args.outputs),
                            str(args.group), str(out), str(ROOT / "fixtures")], check=True)
            results.append(torch.load(out, weights_only=True))
    print("bit-identical:", torch.equal(results[0].view(torch.int16), results[1].view(torch.int16)))


if __name__ == "__main__":
    main()
