"""Benchmark ``adaptools merge PIPELINE LORA OUT`` into an SDXL-shaped UNet against ``cp -r`` of the pipeline
folder and against diffusers (load the UNet, ``load_lora_adapter`` + ``fuse_lora`` + ``unload_lora``, save).

Builds (once, cached under --work) a pipeline folder holding only the UNet, with SDXL's UNet configuration
(2.57B parameters, fp16, 5.1 GB; random values written a tensor at a time from the shapes diffusers' own
``UNet2DConditionModel`` gives on the meta device) and a rank-32 LoRA in diffusers keys on every attention
projection, ``proj_in``/``proj_out`` and feed-forward linear of the UNet (what kohya's and diffusers' SDXL
trainers target), then runs each contender --repeat times, interleaved (the first ``cp`` also warms the page
cache), and prints median wall time and peak RSS with ratios against ``cp -r`` measured in the same run.

The same UNet is also written as a single-file checkpoint in the original key naming
(``model.diffusion_model.input_blocks…``, made with the diffusion family's own name mapping, a tensor at a
time), and ``adaptools merge SINGLE LORA OUT.safetensors`` runs beside ``cp`` of that file in the same
interleaved run (docs/diffusion.md, "Single-file checkpoints").

    python benchmarks/diffusion.py                  # SDXL UNet, 3 repeats
    python benchmarks/diffusion.py --size small     # a quick run on a 0.1B UNet (checks the script)

Both merges write fp16, the UNet's dtype. diffusers fuses in the weight's dtype on the CPU; adaptools in
fp32 and rounds once (docs/diffusion.md), so the two outputs are not compared here (the tests do that, in
fp32, where diffusers is exact).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge as dense  # noqa: E402  (the dense benchmark's timer and interleaving)

#: SDXL base's UNet configuration (the fields that differ from UNet2DConditionModel's defaults).
SDXL = {"sample_size": 128, "block_out_channels": [320, 640, 1280], "layers_per_block": 2,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048,
        "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816}
SIZES = {"sdxl": SDXL, "small": {**SDXL, "transformer_layers_per_block": [1, 1, 1],
                                 "block_out_channels": [64, 128, 256], "attention_head_dim": [2, 4, 8],
                                 "cross_attention_dim": 256, "projection_class_embeddings_input_dim": 256 + 6 * 256}}
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")

DIFFUSERS_SCRIPT = """
import sys, torch
from diffusers import UNet2DConditionModel
base, lora, out = sys.argv[1:4]
unet = UNet2DConditionModel.from_pretrained(base + "/unet", torch_dtype=torch.float16)
unet.load_lora_adapter(lora, prefix="unet")
unet.fuse_lora()
unet.unload_lora()
unet.save_pretrained(out + "/unet")
"""


def build(pipe: Path, lora: Path, config: dict, rank: int = 32) -> None:
    """The UNet-only pipeline folder (random fp16 values from the meta model's shapes) and the LoRA."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    if pipe.exists() and lora.exists():
        return
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    gen = torch.Generator().manual_seed(0)
    tmp = pipe.with_name(pipe.name + ".tmp")
    (tmp / "unet").mkdir(parents=True, exist_ok=True)
    state = {name: (torch.randn(p.shape, generator=gen) * 0.02).to(torch.float16)
             for name, p in unet.state_dict().items()}
    save_file(state, tmp / "unet" / "diffusion_pytorch_model.safetensors")
    del state
    (tmp / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **config}))
    (tmp / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline",
                                                      "unet": ["diffusers", "UNet2DConditionModel"]}))
    tmp.rename(pipe)
    factors = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(TARGETS):
            a = torch.randn(rank, module.in_features, generator=gen)
            b = torch.randn(module.out_features, rank, generator=gen)
            factors[f"unet.{name}.lora_A.weight"] = (a * 0.01).half()
            factors[f"unet.{name}.lora_B.weight"] = (b * 0.01).half()
    save_file(factors, lora)


def build_single(pipe: Path, single: Path) -> None:
    """The pipeline's UNet as one single-file checkpoint in the original key naming, streamed a tensor at a
    time (cached)."""
    from safetensors import safe_open

    from adaptools.plugin import SafetensorsWriter, TensorSpec
    from adaptools_plugins.diffusion import ldm_names

    if single.exists():
        return
    with safe_open(str(pipe / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        names = list(f.keys())
        layout = ldm_names.layout_of_diffusers(names)
        keys = {n: ldm_names.UNET + str(ldm_names.unet_to_original(n, layout)) for n in names}
        specs = {keys[n]: TensorSpec(f.get_slice(n).get_dtype(), tuple(f.get_slice(n).get_shape())) for n in names}
        tmp = single.with_name(single.name + ".tmp")
        with SafetensorsWriter(tmp, specs, {"format": "pt"}) as out:
            for n in names:
                out.write(keys[n], f.get_tensor(n))
    tmp.rename(single)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("benchmarks/.work"))
    parser.add_argument("--size", choices=sorted(SIZES), default="sdxl")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-diffusers", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    pipe, lora = args.work / f"{args.size}-pipe", args.work / f"{args.size}-lora-r32.safetensors"
    print(f"building {pipe} and {lora} (cached) ...", file=sys.stderr)
    build(pipe, lora, SIZES[args.size])
    single = args.work / f"{args.size}-single.safetensors"
    build_single(pipe, single)
    out = args.work / "diffusion-out"
    single_out = args.work / "diffusion-out.safetensors"
    adaptools_cmd = [sys.executable, "-m", "adaptools"]
    contenders = {
        "cp -r (pipeline folder)": ["cp", "-r", str(pipe), str(out)],
        "adaptools merge": [*adaptools_cmd, "merge", str(pipe), str(lora), str(out), "--json"],
        "cp (single file)": ["cp", str(single), str(single_out)],
        "adaptools merge (single file)": [*adaptools_cmd, "merge", str(single), str(lora), str(single_out), "--json"],
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
    }

    def timer(cmd: list[str], folder: Path, profile: dict | None) -> tuple[float, int]:
        single_out.unlink(missing_ok=True)
        try:
            return dense.measure(cmd, folder, profile)
        finally:
            single_out.unlink(missing_ok=True)

    if not args.skip_diffusers:
        contenders["diffusers load + fuse_lora + save"] = [sys.executable, "-c", DIFFUSERS_SCRIPT, str(pipe),
                                                           str(lora), str(out)]
    results, _ = dense.run_interleaved(contenders, out, args.repeat, timer)
    torch_s = results['python -c "import torch"']["wall_s"]
    size = sum(f.stat().st_size for f in pipe.rglob("*") if f.is_file())
    print(f"\nbase: {size / 1e9:.2f} GB fp16 UNet ({args.size}); rank-32 LoRA on {len(TARGETS)} linear kinds; "
          f"medians of {args.repeat}")
    print(f"{'contender':36s} {'wall s':>8s} {'x cp':>8s} {'work s':>8s} {'work x cp':>10s} {'peak RSS GiB':>13s}")
    for name, r in results.items():  # each against the cp of its own base (folder or single file)
        cp = results["cp (single file)" if "single file" in name else "cp -r (pipeline folder)"]["wall_s"]
        work = r["wall_s"] - torch_s if name.startswith(("adaptools", "diffusers")) else r["wall_s"]
        r["work_s"] = work
        print(f"{name:36s} {r['wall_s']:8.2f} {r['wall_s'] / cp:8.2f} {work:8.2f} {work / cp:10.2f} "
              f"{r['peak_rss_bytes'] / 2**30:13.2f}")
    if args.json:
        args.json.write_text(json.dumps({"bytes": size, "results": results}, indent=2))


if __name__ == "__main__":
    main()
