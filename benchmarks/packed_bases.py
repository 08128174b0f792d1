"""Benchmark ``adaptools dequantize`` and dequantize-``merge`` of packed-int4 bases (AWQ GEMM; GPTQ when its
family's fixture packer is present) of a synthetic 1.1B against ``cp -r`` of its dense base, same run.

The dense base and LoRA are benchmarks/merge.py's (cached under --work). Each packed base is made from the
dense one shard by shard with the format's fixture packer (round to nearest in groups of 128: the layout the
loaders read, not a calibrated quantization, which does not change what decoding costs), and cached too.

    python benchmarks/packed_bases.py [--repeat 3] [--formats awq] [--fallback]

--fallback adds each format's dequantize and merge with the packed-integer kernel turned off
(``ADAPTOOLS_PACKED_PURE_TORCH=1``: the torch decoders), same run, as the kernel's baseline.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "fixtures"))

GROUP = 128
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _awq(weight):  # type: ignore[no-untyped-def]
    import build_awq

    return build_awq.quantize_linear(weight, GROUP), {"quant_method": "awq", "bits": 4, "group_size": GROUP,
                                                      "zero_point": True, "version": "gemm"}


def _gptq(weight):  # type: ignore[no-untyped-def]
    import build_gptq  # the gptq family's fixture packer

    return build_gptq.benchmark_linear(weight, GROUP)


PACKERS = {"awq": _awq, "gptq": _gptq}


def pack_base(dense: Path, out: Path, fmt: str) -> None:
    """``dense`` with every decoder linear packed by ``fmt``'s fixture packer, one shard at a time."""
    import torch
    from safetensors.torch import load_file, save_file

    if (out / "config.json").exists():
        return
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map, quant = {}, {}
    for shard in sorted(dense.glob("*.safetensors")):
        result = {}
        for name, tensor in load_file(str(shard)).items():
            module = name.removesuffix(".weight")
            if name.endswith(".weight") and module.rsplit(".", 1)[-1] in LINEARS:
                parts, quant = PACKERS[fmt](tensor.to(torch.float16))
                result.update({f"{module}.{k}": v.contiguous() for k, v in parts.items()})
            else:
                result[name] = tensor
        save_file(result, str(tmp / shard.name), {"format": "pt"})
        weight_map.update({k: shard.name for k in result})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((dense / "config.json").read_text())
    config["quantization_config"] = quant
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tmp.rename(out)


def main() -> None:
    from merge import SIZES, build_adapter, build_base, run_interleaved

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--formats", nargs="+", default=[f for f in PACKERS if f == "awq" or
                                                         (ROOT / "fixtures" / f"build_{f}.py").exists()])
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work")
    parser.add_argument("--fallback", action="store_true", help="also time the torch decoders (no kernel)")
    args = parser.parse_args()
    cfg = SIZES["1b"]
    dense, adapter = args.work / "base-1b", args.work / "lora-1b"
    print(f"building {dense} and {adapter} (cached) ...", file=sys.stderr)
    build_base(dense, cfg)
    build_adapter(adapter, cfg)
    adaptools_cmd = [sys.executable, "-m", "adaptools"]
    out = args.work / "out"
    contenders = {"cp -r (dense base)": ["cp", "-r", str(dense), str(out)]}
    for fmt in args.formats:
        base = args.work / f"base-1b-{fmt}"
        print(f"packing {dense} to {base} (cached) ...", file=sys.stderr)
        pack_base(dense, base, fmt)
        contenders[f"dequantize {fmt}"] = [*adaptools_cmd, "dequantize", str(base), str(out), "--json"]
        contenders[f"merge {fmt}"] = [*adaptools_cmd, "merge", str(base), str(adapter), str(out), "--json"]
        if args.fallback:
            torch_only = ["env", "ADAPTOOLS_PACKED_PURE_TORCH=1", *adaptools_cmd]
            contenders[f"dequantize {fmt} (torch)"] = [*torch_only, "dequantize", str(base), str(out), "--json"]
            contenders[f"merge {fmt} (torch)"] = [*torch_only, "merge", str(base), str(adapter), str(out), "--json"]
    contenders['python -c "import torch"'] = [sys.executable, "-c", "import torch"]
    results, _ = run_interleaved(contenders, out, args.repeat)
    cp = results["cp -r (dense base)"]["wall_s"]
    torch_s = results['python -c "import torch"']["wall_s"]
    print(f"\n1.1B, groups of {GROUP}; medians of {args.repeat}")
    print(f"{'contender':28s} {'wall s':>8s} {'work s':>8s} {'work x cp':>10s} {'peak RSS GiB':>13s}")
    for name, r in results.items():
        work_s = r["wall_s"] - torch_s if name.startswith(("dequantize", "merge")) else r["wall_s"]
        print(f"{name:28s} {r['wall_s']:8.2f} {work_s:8.2f} {work_s / cp:10.2f} {r['peak_rss_bytes'] / 2**30:13.2f}")


if __name__ == "__main__":
    main()
