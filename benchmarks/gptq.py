"""Benchmark the GPTQ decoder against GPTQModel's ``convert_gptq_file`` (its safetensors dequantizer, run from the
oracle venv of fixtures/gptq_oracle.py): seconds and peak RSS to decode one synthetic linear (random codes, zero
points and fp16 scales, checkpoint_format gptq), each contender in a fresh process so that RSS is its own, and
whether the two decodes are the same bits.

    python benchmarks/gptq.py [--inputs 4096 --outputs 11008 --bits 4 --group-size 128 --repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fixtures"))
import gptq_oracle  # noqa: E402

OURS = r"""
import json, resource, sys, time
from adaptools.checkpoint import Checkpoint
start = time.perf_counter()
checkpoint = Checkpoint.open(sys.argv[1])
dense = checkpoint.read("layer.weight")
seconds = time.perf_counter() - start
from safetensors.torch import save_file
save_file({"w": dense}, sys.argv[1] + "/ours.out")
print(json.dumps({"seconds": seconds, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

THEIRS = r"""
import json, resource, time, torch
from pathlib import Path
start = time.perf_counter()
config = json.loads((Path(FOLDER) / "config.json").read_text())["quantization_config"]
dense = md.convert_gptq_file(Path(FOLDER) / "model.safetensors", torch.float16, config, "cpu")["layer.weight"]
seconds = time.perf_counter() - start
from safetensors.torch import save_file
save_file({"w": dense}, FOLDER + "/theirs.out")
print(json.dumps({"seconds": seconds, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def synthetic(folder: Path, inputs: int, outputs: int, bits: int, group_size: int) -> None:
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    groups = inputs // group_size
    def words(rows: int, cols: int) -> torch.Tensor:
        return torch.randint(-2**31, 2**31 - 1, (rows, cols), generator=gen, dtype=torch.int32)

    save_file({"layer.qweight": words(inputs * bits // 32, outputs),
               "layer.qzeros": words(groups, outputs * bits // 32),
               "layer.scales": (torch.rand(groups, outputs, generator=gen) * 0.01 + 1e-4).to(torch.float16),
               "layer.g_idx": torch.arange(inputs, dtype=torch.int32) // group_size}, str(folder / "model.safetensors"))
    config = {"architectures": ["Synthetic"], "quantization_config": {
        "quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": False, "desc_act": False,
        "checkpoint_format": "gptq"}}
    (folder / "config.json").write_text(json.dumps(config))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=4096)
    parser.add_argument("--outputs", type=int, default=11008)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        synthetic(folder, args.inputs, args.outputs, args.bits, args.group_size)
        results: dict[str, list[dict[str, float]]] = {"adaptools": [], "gptqmodel": []}
        for _ in range(args.repeat):
            done = subprocess.run([sys.executable, "-c", OURS, str(folder)], check=True, capture_output=True, text=True)
            results["adaptools"].append(json.loads(done.stdout.strip().splitlines()[-1]))
            out = gptq_oracle.run(THEIRS.replace("FOLDER", repr(str(folder))))
            results["gptqmodel"].append(json.loads(out.strip().splitlines()[-1]))
        from safetensors.torch import load_file

        same = torch.equal(load_file(str(folder / "ours.out"))["w"], load_file(str(folder / "theirs.out"))["w"])
    print(f"{args.bits}-bit [{args.outputs}, {args.inputs}] groups of {args.group_size}; same bits: {same}")
    for name, runs in results.items():
        print(f"{name:10s} median {statistics.median(r['seconds'] for r in runs):.2f} s, "
              f"peak RSS {max(r['peak_mib'] for r in runs):.0f} MiB")


if __name__ == "__main__":
    main()
