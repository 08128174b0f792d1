"""Benchmark compressed-tensors bases.

1. The decoder against the library's own per-module ``decompress``: seconds and peak RSS to decode one weight,
   each contender in a fresh process (so that RSS is its own), for an int4 asymmetric group-32 weight
   (pack-quantized), an fp8 channel weight and an NVFP4 weight. This is the measurement behind
   plugins/compressed_tensors/codec.py's choice to decode without the library.
2. With --engine: `adaptools dequantize` and dequantize-`merge` of a synthetic 1.1B compressed-tensors base
   against `cp -r` of its dense base. The dense base and LoRA are benchmarks/merge.py's (cached under --work);
   each compressed base is made from it shard by shard by the library's per-module ``compress`` (scales from
   ``calculate_qparams`` on each weight's minima and maxima; NVFP4's global scale from ``generate_gparam``
   over the whole weight): W4A16 (int4 symmetric groups of 128, pack-quantized), FP8 per channel
   (float-quantized), int8 per channel (int-quantized, symmetric) and NVFP4 (nvfp4-pack-quantized, the
   library's preset). The round-to-nearest ones (FP8, int8, NVFP4) are also timed with `merge --requantize`.

    python benchmarks/ct_bases.py [--rows 8192 --cols 8192 --repeat 3] [--engine [--fallback]] [--engine-only]
                                  [--kinds w4a16,fp8,int8,nvfp4] [--out DIR]

--fallback adds W4A16 with the packed-integer kernel turned off (``ADAPTOOLS_PACKED_PURE_TORCH=1``), same run.
--out is where each run writes (and deletes) its output, <work>/out by default: give two runs that share the
machine different folders.
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


SCHEMES = {
    "w4a16": ("pack-quantized", {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                 "group_size": 128}),
    "fp8": ("float-quantized", {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}),
    "int8": ("int-quantized", {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}),
    "nvfp4": ("nvfp4-pack-quantized", None),  # the library's NVFP4 preset (fp8 scales per 16, one global scale)
}
#: the kinds `merge --requantize` re-encodes (round to nearest); pack-quantized is refused (docs/compressed-tensors.md)
REQUANTIZE = ("fp8", "int8", "nvfp4")


def _scheme(kind: str):  # -> QuantizationScheme (compressed_tensors is imported lazily)
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import NVFP4

    fmt, weights = SCHEMES[kind]
    if weights is None:
        return QuantizationScheme(targets=["Linear"], format=fmt, **NVFP4)
    return QuantizationScheme(targets=["Linear"], weights=weights, format=fmt)


def compress_base(dense: Path, out: Path, kind: str) -> None:
    """``dense`` compressed by the library, one shard and one module at a time; config.json as the library's
    ``ModelCompressor.update_config`` writes it."""
    import compressed_tensors
    import torch
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam
    from safetensors.torch import load_file, save_file

    if (out / "config.json").exists():
        return
    fmt = SCHEMES[kind][0]
    scheme = _scheme(kind)
    compressor = BaseCompressor.get_value_from_registry(fmt)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map = {}
    for shard in sorted(dense.glob("*.safetensors")):
        result = {}
        for name, tensor in load_file(str(shard)).items():
            module = name.removesuffix(".weight")
            if not name.endswith(".weight") or tensor.dim() != 2 or "embed" in name or "lm_head" in name:
                result[name] = tensor
                continue
            if scheme.weights.strategy in ("group", "tensor_group"):
                grouped = tensor.reshape(tensor.shape[0], -1, scheme.weights.group_size)
                low, high = grouped.amin(-1), grouped.amax(-1)
            else:
                low, high = tensor.amin(1, keepdim=True), tensor.amax(1, keepdim=True)
            if scheme.weights.strategy == "tensor_group":  # NVFP4: one global scale for the whole weight
                glob = generate_gparam(tensor.amin(), tensor.amax())
                scale, _ = calculate_qparams(low, high, scheme.weights, global_scale=glob)
                state = {"weight": tensor, "weight_scale": scale, "weight_global_scale": glob}
                # llm-compressor calibrates the activations' global scale; 1.0 as the test fixture does
                result[f"{module}.input_global_scale"] = torch.ones(1)
            else:
                scale, zero = calculate_qparams(low, high, scheme.weights)
                state = {"weight": tensor, "weight_scale": scale, "weight_zero_point": zero}
            state = compressor.compress(state, scheme)
            result.update({f"{module}.{k}": v.contiguous() for k, v in state.items()})
        save_file(result, str(tmp / shard.name), {"format": "pt"})
        weight_map.update({k: shard.name for k in result})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((dense / "config.json").read_text())
    quant = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"], format=fmt,
                               quantization_status="compressed")
    config["quantization_config"] = {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors",
                                     "sparsity_config": {}, "transform_config": {},
                                     **json.loads(quant.model_dump_json(exclude={"quant_method"}))}
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tmp.rename(out)


def engine(work: Path, repeat: int, fallback: bool = False, kinds: tuple[str, ...] = tuple(SCHEMES),
           out: Path | None = None) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from merge import SIZES, build_adapter, build_base, print_profiles, run_interleaved

    cfg = SIZES["1b"]
    dense, adapter = work / "base-1b", work / "lora-1b"
    print(f"building {dense} and {adapter} (cached) ...", file=sys.stderr)
    build_base(dense, cfg)
    build_adapter(adapter, cfg)
    adaptools_cmd = [sys.executable, "-m", "adaptools"]
    out = out or work / "out"
    contenders = {"cp -r (dense base)": ["cp", "-r", str(dense), str(out)]}
    for kind in kinds:
        base = work / f"base-1b-ct-{kind}"
        print(f"compressing {dense} to {base} (cached) ...", file=sys.stderr)
        compress_base(dense, base, kind)
        contenders[f"dequantize {kind}"] = [*adaptools_cmd, "dequantize", str(base), str(out), "--json"]
        contenders[f"merge {kind}"] = [*adaptools_cmd, "merge", str(base), str(adapter), str(out), "--json"]
        if kind in REQUANTIZE:
            contenders[f"merge --requantize {kind}"] = [*adaptools_cmd, "merge", str(base), str(adapter), str(out),
                                                        "--requantize", "--json"]
        if fallback and SCHEMES[kind][0] == "pack-quantized":  # the torch decoder the packed kernel replaces
            torch_only = ["env", "ADAPTOOLS_PACKED_PURE_TORCH=1", *adaptools_cmd]
            contenders[f"dequantize {kind} (torch)"] = [*torch_only, "dequantize", str(base), str(out), "--json"]
            contenders[f"merge {kind} (torch)"] = [*torch_only, "merge", str(base), str(adapter), str(out), "--json"]
    contenders['python -c "import torch"'] = [sys.executable, "-c", "import torch"]
    results, profiles = run_interleaved(contenders, out, repeat)
    cp = results["cp -r (dense base)"]["wall_s"]
    torch_s = results['python -c "import torch"']["wall_s"]
    print(f"\n1.1B; medians of {repeat}")
    print(f"{'contender':28s} {'wall s':>8s} {'work s':>8s} {'work x cp':>10s} {'CPU s':>8s} {'peak RSS GiB':>13s}")
    for name, r in results.items():
        work_s = r["wall_s"] - torch_s if name.startswith(("dequantize", "merge")) else r["wall_s"]
        print(f"{name:28s} {r['wall_s']:8.2f} {work_s:8.2f} {work_s / cp:10.2f} {r['cpu_s']:8.2f} "
              f"{r['peak_rss_bytes'] / 2**30:13.2f}")
    print_profiles(profiles)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--cols", type=int, default=8192)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--engine", action="store_true", help="also the 1.1B dequantize/merge against cp -r")
    parser.add_argument("--engine-only", action="store_true", help="only the 1.1B runs")
    parser.add_argument("--fallback", action="store_true",
                        help="with --engine: also pack-quantized with the packed kernel off (the torch decoder)")
    parser.add_argument("--kinds", default=",".join(SCHEMES),
                        help=f"with --engine: the compressed bases to time, of {','.join(SCHEMES)}")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work")
    parser.add_argument("--out", type=Path, help="where each run writes its output (default <work>/out)")
    args = parser.parse_args()
    kinds = tuple(args.kinds.split(","))
    if not set(kinds) <= set(SCHEMES):
        parser.error(f"--kinds: choose from {','.join(SCHEMES)}")
    if args.engine_only:
        engine(args.work, args.repeat, args.fallback, kinds, args.out)
        return
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
    if args.engine:
        engine(args.work, args.repeat, args.fallback, kinds, args.out)


if __name__ == "__main__":
    main()
