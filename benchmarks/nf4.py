"""NF4 benchmarks: our 4-bit encode/decode against bitsandbytes in the same run, and which merge base
keeps a QLoRA fine-tune best.

    python benchmarks/nf4.py                 # codec GB/s (bf16, blocksize 64, double quant) + merge-base table
    python benchmarks/nf4.py --sizes 4096 8192

GB/s counts the bf16 side (2 bytes per element). Every figure is the median of 5 runs after a warm-up.
The merge-base table uses the fixtures: the reference is what QLoRA trains against (the 4-bit base
with the adapter applied unmerged); each merged variant is compared with it by KL divergence of the
next-token distributions and top-1 agreement.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def median_time(fn, repeat: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def codec(sizes: list[int]) -> None:
    import bitsandbytes.functional as F

    from adaptools_plugins.bitsandbytes import nf4 as nf4

    print(f"{'size':>6s} {'op':12s} {'bnb GB/s':>9s} {'ours GB/s':>10s} {'ratio':>6s}  identical")
    for n in sizes:
        a = (torch.randn(n, n) * 0.02).to(torch.bfloat16)
        gb = a.numel() * 2 / 1e9
        t_bnb = median_time(lambda: F.quantize_4bit(a, blocksize=64, quant_type="nf4", compress_statistics=True))
        t_ours = median_time(lambda: nf4.quantize_4bit(a, 64, "nf4", True))
        pb, sb = F.quantize_4bit(a, blocksize=64, quant_type="nf4", compress_statistics=True)
        po, so = nf4.quantize_4bit(a, 64, "nf4", True)
        same = torch.equal(pb, po) and torch.equal(sb.absmax, so.absmax)
        print(f"{n:6d} {'quantize':12s} {gb / t_bnb:9.3f} {gb / t_ours:10.3f} {t_bnb / t_ours:6.1f}  {same}")
        t_bnb = median_time(lambda: F.dequantize_4bit(pb, sb))
        t_ours = median_time(lambda: nf4.dequantize_4bit(po, so))
        same = torch.equal(F.dequantize_4bit(pb, sb), nf4.dequantize_4bit(po, so))
        print(f"{n:6d} {'dequantize':12s} {gb / t_bnb:9.3f} {gb / t_ours:10.3f} {t_bnb / t_ours:6.1f}  {same}")
        odd = (torch.randn(n, n - 16) * 0.02).to(torch.bfloat16)  # ncols % 64 != 0: bitsandbytes' CPU bug case
        po, so = nf4.quantize_4bit(odd, 64, "nf4", True)
        t_ours = median_time(lambda: nf4.dequantize_4bit(po, so))
        print(f"{n:6d} {'dequant odd':12s} {'(wrong)':>9s} {odd.numel() * 2 / 1e9 / t_ours:10.3f}")


def merge_base_table(weight: float) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from peft_oracle import INPUT_IDS, load_base

    import adaptools
    from adaptools.operations.merge import MergeInput, merge

    fixtures = ROOT / "fixtures"
    adapter = adaptools.load(fixtures / "adapters" / "llama-lora")
    ids = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(0))
    ids[0, : INPUT_IDS.shape[1]] = INPUT_IDS[0]

    def run(model):
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False  # docs/nf4.md, "Weight repacking in the CPU forward"
        with torch.no_grad():
            return model(input_ids=ids).logits.float().log_softmax(-1)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        merge(fixtures / "bases" / "llama-nf4", [], tmp / "deq", operation="dequantize")
        # the reference: dequantized 4-bit base with the adapter applied unmerged (what QLoRA computes)
        model = load_base(tmp / "deq", torch.float32)
        method = adaptools.plugin.get_method("lora")
        scaled = adaptools.Adapter("lora", adapter.config, adaptools.plugin.MemoryStore(
            {n: adapter.tensor(n) * (weight if n.endswith("lora_B") else 1.0) for n in adapter.tensor_names()}))
        with method.apply(scaled, model):
            reference = run(model)
        merge(fixtures / "bases" / "llama", [], tmp / "orig16", dtype="bf16")
        variants = {
            "no adapter (4-bit base)": (fixtures / "bases" / "llama-nf4", None, {}),
            "merged into 4-bit (--requantize)": (fixtures / "bases" / "llama-nf4", weight, {"requantize": True}),
            "dequantize-merge (default)": (fixtures / "bases" / "llama-nf4", weight, {}),
            "merged onto original 16-bit": (tmp / "orig16", weight, {}),
        }
        print(f"\nmerge base, adapter weight {weight} (reference: 4-bit base + adapter unmerged)")
        print(f"{'variant':36s} {'KL':>10s} {'top-1 agree':>12s}")
        for i, (name, (base, w, kw)) in enumerate(variants.items()):
            out = tmp / f"v{i}"
            merge(base, [MergeInput(adapter, w)] if w is not None else [], out, **kw)
            got = run(load_base(out, torch.float32) if not kw else _load4(out))
            kl = torch.nn.functional.kl_div(got, reference, log_target=True, reduction="batchmean").item()
            agree = (got.argmax(-1) == reference.argmax(-1)).float().mean().item()
            print(f"{name:36s} {kl / ids.shape[1]:10.2e} {agree:12.1%}")


def _load4(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.float32).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--weight", type=float, default=0.1, help="scale of the fixture adapter's delta")
    args = parser.parse_args()
    codec(args.sizes)
    merge_base_table(args.weight)


if __name__ == "__main__":
    main()
