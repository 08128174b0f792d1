"""adaptools' GGUF merge beside llama.cpp's own ``llama-export-lora``, same base, same adapter, same run.

The base is benchmarks/gguf_merge.py's synthetic 1.1B Llama in Q8_0 and the adapter benchmarks/merge.py's
r=16 LoRA on every linear layer, written as a GGUF LoRA by ``adaptools convert --to gguf`` (what both tools
read). For each tool: median wall time and peak RSS against ``cp`` of the base, the output's size and tensor
types, and max |Δlogit| / max |logit| of the merged file against the base with the adapter applied at runtime
by llama.cpp (the reference both should reach), on a few fixed token sequences. llama-export-lora comes from
fixtures/llamacpp_tools.py (built once from the vendored llama.cpp), the logits from fixtures/llamacpp.py's
llama-cpp-python venv (built once).

    python benchmarks/gguf_export_lora.py              # 3 repeats
    python benchmarks/gguf_export_lora.py --json out.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "fixtures"))
import gguf_merge  # noqa: E402  (the Q8_0 base and the one-file timer)
import llamacpp  # noqa: E402
import llamacpp_tools  # noqa: E402
import merge as dense  # noqa: E402  (shapes, adapter, interleaved runs)


def types_of(path: Path) -> dict[str, int]:
    """Tensor count per GGUF type in ``path``."""
    reader = gguf.GGUFReader(path)
    return dict(collections.Counter(t.tensor_type.name for t in reader.tensors))


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("benchmarks/.work"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cfg = dense.SIZES["1b"]
    args.work.mkdir(parents=True, exist_ok=True)
    base, peft_dir = args.work / "base-1b-q8_0.gguf", args.work / "lora-1b"
    lora = args.work / "lora-1b.gguf"
    print("building the base, the adapter and llama-export-lora (cached) ...", file=sys.stderr)
    gguf_merge.build_base(base, cfg)
    dense.build_adapter(peft_dir, cfg)
    adaptools_cmd = [sys.executable, "-m", "adaptools"]
    if not lora.exists():
        subprocess.run([*adaptools_cmd, "convert", str(peft_dir), str(lora), "--to", "gguf", "--base", str(base)],
                       check=True, stdout=subprocess.DEVNULL)
    export_lora = llamacpp_tools.tool("llama-export-lora")
    threads = str(os.cpu_count() or 2)
    out = args.work / "out.gguf"
    contenders = {
        "cp (Q8_0 base)": ["cp", str(base), str(out)],
        "adaptools merge": [*adaptools_cmd, "merge", str(base), str(lora), str(out), "--json"],
        "llama-export-lora": [str(export_lora), "-m", str(base), "--lora", str(lora), "-o", str(out), "-t", threads],
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
    }
    results, _ = dense.run_interleaved(contenders, out, args.repeat, gguf_merge.measure)
    cp = results["cp (Q8_0 base)"]["wall_s"]
    torch_s = results['python -c "import torch"']["wall_s"]

    # one more run of each tool, kept, for size, types and logits
    kept = {"adaptools merge": args.work / "merged-adaptools.gguf",
            "llama-export-lora": args.work / "merged-export-lora.gguf"}
    for name, path in kept.items():
        cmd = [str(path) if part == str(out) else part for part in contenders[name]]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    gen = np.random.default_rng(0)
    ids = [gen.integers(3, cfg["vocab_size"], 12).tolist() for _ in range(2)]
    runtime, log = llamacpp.logits(base, [lora, None], ids, args.work / "runtime.npy")
    if runtime is None:
        raise SystemExit(f"llama.cpp did not run the base with the adapter:\n{log}")
    effect = relative(runtime[1], runtime[0])
    print(f"\nbase: {base.stat().st_size / 1e9:.2f} GB Q8_0; r=16 LoRA on every linear layer; medians of "
          f"{args.repeat}; the adapter's own effect on the logits {effect:.3g}")
    print(f"{'contender':26s} {'wall s':>7s} {'x cp':>6s} {'work x cp':>9s} {'RSS GiB':>8s} {'size GB':>8s} "
          f"{'vs runtime':>10s}  types")
    for name, r in results.items():
        work = r["wall_s"] - torch_s if name.startswith("adaptools") else r["wall_s"]
        r["work_s"] = work
        rss = r["peak_rss_bytes"] / 2**30
        line = f"{name:26s} {r['wall_s']:7.2f} {r['wall_s'] / cp:6.2f} {work / cp:9.2f} {rss:8.2f}"
        if name in kept:
            merged, log = llamacpp.logits(kept[name], [None], ids, args.work / "merged.npy")
            if merged is None:
                raise SystemExit(f"llama.cpp did not load {kept[name]}:\n{log}")
            r["size_bytes"] = kept[name].stat().st_size
            r["types"] = types_of(kept[name])
            r["vs_runtime"] = relative(merged[0], runtime[0])
            line += f" {r['size_bytes'] / 1e9:8.2f} {r['vs_runtime']:10.3g}  {r['types']}"
        print(line)
    for path in kept.values():
        path.unlink()
    if args.json:
        args.json.write_text(json.dumps({"bytes": base.stat().st_size, "adapter_effect": effect,
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
