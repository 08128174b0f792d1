"""Benchmark `adaptools merge` against `cp -r` of the base and PEFT's load + merge_and_unload + save.

Builds (once, cached under --work) a synthetic Llama checkpoint in bf16, sharded, with TinyLlama-1.1B's
shapes (about 1.1B parameters, 2.2 GB), and a PEFT LoRA of rank 16 on every linear layer. Then runs each
contender --repeat times (the first `cp -r` also warms the page cache) and prints wall time and peak RSS,
medians, with ratios against `cp -r` measured in the same run.

    python benchmarks/merge.py                       # 1.1B, 3 repeats, all contenders
    python benchmarks/merge.py --size 3b --skip-peft # a 3.2B checkpoint (6.4 GB)
    python benchmarks/merge.py --json results.json
    python benchmarks/merge.py --nf4                 # the same base quantized to NF4: dequantize-merge and
                                                     # merge --requantize against cp -r of the dense base

Peak RSS is each process's own maximum resident set, and CPU time its user + system seconds, from GNU
time (/usr/bin/time, Debian package "time"): on a machine shared with other jobs, CPU time moves less than
wall time. Wall time includes interpreter start-up, so the run also times `python -c "import torch"`:
work time = wall time minus that, the figure the targets are about. The profile (from `merge --json`)
says where a merge's time went: planning, reading, computing, encoding, writing (in a background
thread, so it overlaps the rest), finalizing; start-up is the wall time the process spent before and
around the engine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

SIZES = {
    # TinyLlama-1.1B shapes
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
           "num_key_value_heads": 4, "vocab_size": 32000},
    # Llama-3.2-3B shapes (untied here for size)
    "3b": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24,
           "num_key_value_heads": 8, "vocab_size": 128256},
}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    out = [("model.embed_tokens.weight", (v, h))]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def build_base(path: Path, cfg: dict, shard_bytes: int = 1_000_000_000) -> None:
    from adaptools.plugin import SafetensorsWriter, TensorSpec

    if (path / "config.json").exists():
        return
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes(cfg):
        nbytes = 2 * int(torch.tensor(shape).prod())
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    weight_map, total = {}, 0
    for n, group in enumerate(groups):
        file = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        specs = {name: TensorSpec("BF16", shape) for name, shape in group}
        with SafetensorsWriter(tmp / file, specs, {"format": "pt"}) as out:
            for name, shape in group:
                t = torch.randn(shape, generator=gen).mul_(0.02).to(torch.bfloat16)
                if "norm" in name:
                    t = torch.ones(shape, dtype=torch.bfloat16)
                out.write(name, t)
                weight_map[name] = file
                total += t.numel() * 2
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": "bfloat16",
              "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, **cfg}
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tmp.rename(path)


def build_adapter(path: Path, cfg: dict, rank: int = 16) -> None:
    from adaptools.plugin import save_tensors

    if (path / "adapter_config.json").exists():
        return
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for name, shape in shapes(cfg):
        module = name[: -len(".weight")]
        if module.rsplit(".", 1)[-1] in LINEARS:
            out_f, in_f = shape
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) * 0.01
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * 0.01
    save_tensors(path / "adapter_model.safetensors", tensors, {"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": list(LINEARS), "base_model_name_or_path": None, "revision": None,
              "bias": "none", "fan_in_fan_out": False, "lora_dropout": 0.0, "use_rslora": False,
              "use_dora": False, "init_lora_weights": True, "inference_mode": True}
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))


PEFT_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""


def measure(cmd: list[str], out: Path, profile: dict | None = None) -> tuple[float, int]:
    """Run ``cmd``; return (wall seconds, peak RSS bytes of that process); ``profile`` receives the
    process's CPU seconds (user + system) as ``cpu_s``, and the engine's profile when the command prints a
    --json summary.

    GNU time reports the child's own peak; os.wait4 would count the pages this (large) parent process had
    when it forked.
    """
    shutil.rmtree(out, ignore_errors=True)
    os.sync()  # start every run with no dirty pages from the last one being written back
    env = {**os.environ, "ADAPTOOLS_LOAD_PLUGINS": "", "TRANSFORMERS_VERBOSITY": "error"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # run as installed: see compile_sources
    timer = shutil.which("time") or "/usr/bin/time"
    start = time.perf_counter()
    proc = subprocess.run([timer, "-f", "adaptools-bench-rss %M %U %S", *cmd], capture_output=True, text=True,
                          env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr}")
    rss_kb, user, system = proc.stderr.rsplit("adaptools-bench-rss ", 1)[1].split()[:3]
    shutil.rmtree(out, ignore_errors=True)
    if profile is not None:
        profile["cpu_s"] = float(user) + float(system)
    if profile is not None and proc.stdout.lstrip().startswith("{"):
        data = json.loads(proc.stdout)
        profile.update(data.get("profile", {}), engine=data.get("seconds", 0.0), wall=wall)
    return wall, int(rss_kb) * 1024


def compile_sources() -> None:
    """Byte-compile adaptools and its plugins, as ``pip install`` does for an installed package. A checkout
    run with PYTHONDONTWRITEBYTECODE set (some sandboxes set it) would otherwise compile every module again in
    every timed run, 0.1-0.2 s that no installed copy spends."""
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(root / "adaptools"), str(root / "plugins")],
                   check=True, env={k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"})


def run_interleaved(contenders: dict[str, list[str]], out: Path, repeat: int,
                    timer: Callable[[list[str], Path, dict | None], tuple[float, int]] = measure,
                    ) -> tuple[dict[str, dict], dict[str, list[dict]]]:
    """Each contender ``repeat`` times with ``timer``, after one warm-up run of the first (the page cache), in
    turn, so that drift in disk state hits every contender alike: (median wall seconds, CPU seconds (NaN where
    the timer gives none) and peak RSS bytes with every run, by contender; the engine profiles of the runs
    that printed one, by contender)."""
    compile_sources()
    timer(next(iter(contenders.values())), out, None)  # warm the page cache
    runs_by: dict[str, list[tuple[float, int, float]]] = {name: [] for name in contenders}
    profiles: dict[str, list[dict]] = {name: [] for name in contenders}
    for _ in range(repeat):
        for name, cmd in contenders.items():
            profile: dict = {}
            wall, rss = timer(cmd, out, profile)
            runs_by[name].append((wall, rss, profile.pop("cpu_s", float("nan"))))
            if profile:
                profiles[name].append(profile)
    results = {name: {"wall_s": statistics.median(r[0] for r in runs),
                      "peak_rss_bytes": statistics.median(r[1] for r in runs),
                      "cpu_s": statistics.median(r[2] for r in runs),
                      "runs": [{"wall_s": w, "peak_rss_bytes": m, "cpu_s": c} for w, m, c in runs]}
               for name, runs in runs_by.items()}
    return results, profiles


def print_against_dense_cp(results: dict[str, dict], profiles: dict[str, list[dict]], title: str) -> None:
    """The table of a quantized-base benchmark (fp8.py, mxfp4.py): each contender's wall, work (wall minus
    ``python -c "import torch"`` for adaptools' runs), work over ``cp -r (dense base)``, CPU and peak RSS, then
    the engine profiles."""
    cp = results["cp -r (dense base)"]["wall_s"]
    torch_s = results['python -c "import torch"']["wall_s"]
    print(f"\n{title}")
    print(f"{'contender':36s} {'wall s':>8s} {'work s':>8s} {'work x cp':>10s} {'CPU s':>8s} {'peak RSS GiB':>13s}")
    for name, r in results.items():
        work_s = r["wall_s"] - torch_s if name.startswith("adaptools") else r["wall_s"]
        print(f"{name:36s} {r['wall_s']:8.2f} {work_s:8.2f} {work_s / cp:10.2f} {r['cpu_s']:8.2f} "
              f"{r['peak_rss_bytes'] / 2**30:13.2f}")
    print_profiles(profiles)


def print_profiles(profiles: dict[str, list[dict]]) -> None:
    """Where each engine run's time went (medians of the runs' ``merge --json`` profiles), one line each."""
    for name, runs in profiles.items():
        if runs:
            median = {k: statistics.median(p.get(k, 0.0) for p in runs) for k in runs[0]}
            parts = ", ".join(f"{k} {median[k]:.2f}" for k in ("plan", "read", "compute", "encode",
                                                              "write_background", "finalize") if k in median)
            startup = median["wall"] - median["engine"]
            print(f"  {name}: start-up and imports {startup:.2f} s; {parts} (seconds, medians)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--work", type=Path, default=Path("benchmarks/.work"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--nf4", action="store_true", help="benchmark a 4-bit (NF4) base instead")
    parser.add_argument("--profile", action="store_true", help="print where each adaptools run spent its time")
    args = parser.parse_args()
    cfg = SIZES[args.size]
    base, adapter = args.work / f"base-{args.size}", args.work / f"lora-{args.size}"
    print(f"building {base} and {adapter} (cached) ...", file=sys.stderr)
    build_base(base, cfg)
    build_adapter(adapter, cfg)
    out = args.work / "out"
    adaptools_cmd = [sys.executable, "-m", "adaptools"]
    if args.nf4:
        nf4 = args.work / f"base-{args.size}-nf4"
        if not (nf4 / "config.json").exists():
            print(f"quantizing {base} to {nf4} ...", file=sys.stderr)
            subprocess.run([*adaptools_cmd, "requantize", str(base), str(nf4)], check=True, stdout=subprocess.DEVNULL)
        base = nf4
        contenders = {
            "cp -r (dense base)": ["cp", "-r", str(args.work / f"base-{args.size}"), str(out)],
            "cp -r (4-bit base)": ["cp", "-r", str(base), str(out)],
            "adaptools dequantize": [*adaptools_cmd, "dequantize", str(base), str(out), "--json"],
            "adaptools merge (dequantize-merge)": [*adaptools_cmd, "merge", str(base), str(adapter), str(out),
                                                   "--json"],
            "adaptools merge --requantize": [*adaptools_cmd, "merge", str(base), str(adapter), str(out),
                                             "--requantize", "--json"],
        }
        args.skip_peft = True
    else:
        contenders = {
            "cp -r": ["cp", "-r", str(base), str(out)],
            "adaptools merge": [*adaptools_cmd, "merge", str(base), str(adapter), str(out), "--json"],
        }
    contenders['python -c "import torch"'] = [sys.executable, "-c", "import torch"]
    contenders["adaptools --version"] = [*adaptools_cmd, "--version"]
    if not args.skip_peft:
        contenders["peft merge_and_unload"] = [sys.executable, "-c", PEFT_SCRIPT, str(base), str(adapter), str(out)]
    baseline = next(iter(contenders))
    results, profiles = run_interleaved(contenders, out, args.repeat)
    for name in contenders:
        print(f"{name:36s} {results[name]['wall_s']:7.2f} s  {results[name]['peak_rss_bytes'] / 2**30:6.2f} GiB",
              file=sys.stderr)
    cp = results[baseline]["wall_s"]
    torch_s = results['python -c "import torch"']["wall_s"]
    size_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    print(f"\ncheckpoint: {args.size}, {size_bytes / 1e9:.2f} GB; medians of {args.repeat}")
    print(f"{'contender':36s} {'wall s':>8s} {'x cp -r':>8s} {'work s':>8s} {'work x cp':>10s} {'CPU s':>8s} "
          f"{'peak RSS GiB':>13s}")
    for name, r in results.items():
        work = r["wall_s"] - torch_s if name.startswith("adaptools") else r["wall_s"]
        r["work_s"] = work
        print(f"{name:36s} {r['wall_s']:8.2f} {r['wall_s'] / cp:8.2f} {work:8.2f} {work / cp:10.2f} "
              f"{r['cpu_s']:8.2f} {r['peak_rss_bytes'] / 2**30:13.2f}")
    if args.nf4:
        requantize = results["adaptools merge --requantize"]["wall_s"]
        ratio = requantize / results["adaptools merge (dequantize-merge)"]["wall_s"]
        print(f"merge --requantize takes {ratio:.2f}x dequantize-merge")
    for name, runs in profiles.items():
        if not runs:
            continue
        median = {k: statistics.median(p.get(k, 0.0) for p in runs) for k in runs[0]}
        results[name]["profile"] = median
        if args.profile:
            startup = median["wall"] - median["engine"] - median.get("plan", 0.0)
            parts = ", ".join(f"{k} {median[k]:.2f}" for k in ("plan", "read", "compute", "encode",
                                                              "write_background", "finalize", "checks") if k in median)
            print(f"  {name}: start-up and imports {startup:.2f} s; {parts} (seconds, medians)")
    if "peft merge_and_unload" in results:
        ratio = results["peft merge_and_unload"]["wall_s"] / results["adaptools merge"]["wall_s"]
        print(f"adaptools is {ratio:.1f}x faster than PEFT")
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "bytes": size_bytes, "results": results}, indent=2))


if __name__ == "__main__":
    main()
