"""Micro-benchmark of the packed-integer kernel (adaptools/csrc/packed_kernels.c): ns per value on one thread
for one AWQ and one GPTQ 4-bit weight (5632 x 2048 by default, group 128), decoded through each family's codec;
CPU seconds (process time), medians, since the benchmark machine is shared.

``--baseline DIR`` also times the ``_packed_kernels*.so`` found in DIR (say, a copy of the library built from
the previous commit) in the same run, alternating with this build, and checks that both give the same bits.

    python benchmarks/packed_kernel.py [--baseline /tmp/old] [--outputs 5632 --inputs 2048 --repeat 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from adaptools import kernels, packed
from adaptools_plugins.awq import codec as awq
from adaptools_plugins.gptq import codec as gptq


def cases(outputs: int, inputs: int, group: int) -> dict[str, tuple]:
    gen = torch.Generator().manual_seed(0)

    def words(*shape: int) -> torch.Tensor:
        return torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int32, generator=gen)

    groups = inputs // group
    scales = (torch.rand(groups, outputs, generator=gen) * 0.01 + 1e-4).to(torch.float16)
    g_idx = torch.arange(inputs, dtype=torch.int32) // group
    act = g_idx[torch.randperm(inputs, generator=gen)]
    gzeros = gptq.zero_points(words(groups, outputs // 8), 4, v1=True)
    return {
        "awq": (awq.dequantize, words(inputs, outputs // 8), words(groups, outputs // 8), scales, group),
        "gptq": (gptq.dequantize, words(inputs // 8, outputs), gzeros, scales, g_idx, 4),
        "gptq act-order": (gptq.dequantize, words(inputs // 8, outputs), gzeros, scales, act, 4),
    }


def timed(lib: object, call: tuple) -> tuple[float, torch.Tensor]:
    packed.LIB = lib
    started = time.process_time()
    result = call[0](*call[1:])
    return time.process_time() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path)
    parser.add_argument("--outputs", type=int, default=5632)
    parser.add_argument("--inputs", type=int, default=2048)
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    kernels.THREADS = 1
    torch.set_num_threads(1)
    libs = {"this build": packed.LIB}
    if args.baseline:
        libs["baseline"] = packed._load(args.baseline)
        assert libs["baseline"] is not None, f"no packed kernel of ABI {packed.ABI} in {args.baseline}"
    values = args.outputs * args.inputs
    for name, call in cases(args.outputs, args.inputs, args.group).items():
        seconds: dict[str, list[float]] = {which: [] for which in libs}
        results = {}
        for _ in range(args.repeat):
            for which, lib in libs.items():
                took, results[which] = timed(lib, call)
                seconds[which].append(took)
        line = "  ".join(f"{which} {statistics.median(s) / values * 1e9:5.2f} ns/value" for which, s in seconds.items())
        same = all(torch.equal(r.view(torch.int16), results["this build"].view(torch.int16)) for r in results.values())
        print(f"{name:15s} {line}  same bits: {same}")


if __name__ == "__main__":
    main()
