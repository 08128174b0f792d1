"""Benchmark MXFP4 (gpt-oss) bases: `adaptools dequantize` and dequantize-`merge` of a synthetic 1.1B gpt-oss
against `cp -r` of its dense (bf16) base.

gpt-oss stores only its fused MoE experts in MXFP4 (``P_blocks``/``P_scales``, docs/mxfp4.md), so the model
is MoE-shaped to make the experts most of it: 6 layers of hidden size 2048 (32 heads of 64, 4 KV heads), 32
experts of width 768, a 32,000-token vocabulary, about 1.09B parameters, 0.91B of them experts. The tensor
names and shapes are transformers' own (``GptOssForCausalLM`` built on the meta device); dense tensors are
seeded bf16 noise, and each expert parameter is packed by the test fixture's ``pack``
(fixtures/build_mxfp4.py: seeded random FP4 codes and exponents around 127, the bytes whose decoding the
tests compare with transformers' bit for bit), with gpt-oss's own ``quantization_config``. The dense base is
that checkpoint through `adaptools dequantize` (equal to transformers' dequantized model, tests/test_mxfp4.py).
The LoRA (r=16) is PEFT's: ``get_peft_model`` with ``target_parameters`` on the fused experts
(``gate_up_proj``, ``down_proj``) and ``target_modules`` on the attention linears, on the meta model, its
tensor names and shapes from ``get_peft_model_state_dict``, filled with seeded noise. All three are cached
under --work.

Contenders run interleaved, --repeat times each, after a warm-up `cp -r`; wall time, CPU time (user +
system) and peak RSS (GNU time) are medians; work time is wall time minus `python -c "import torch"` from
the same run. `merge --requantize` is not timed: re-encoding MXFP4 is refused (docs/mxfp4.md).

    python benchmarks/mxfp4.py [--repeat 3] [--out DIR]   # --out: where each run writes (and deletes) output
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from merge import print_against_dense_cp, run_interleaved

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fixtures"))

#: about 1.1B parameters, most of them experts (hidden 2048 and width 768: whole MXFP4 blocks of 32)
CONFIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=768, num_hidden_layers=6,
              num_attention_heads=32, num_key_value_heads=4, head_dim=64, max_position_embeddings=4096,
              tie_word_embeddings=False, num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
              layer_types=["sliding_attention", "full_attention"] * 3)
RANK = 16


def _meta_model() -> torch.nn.Module:
    import transformers as tf

    with torch.device("meta"):
        return tf.GptOssForCausalLM(tf.GptOssConfig(**CONFIG))


def build_base(path: Path, shard_bytes: int = 500_000_000) -> None:
    """The MXFP4 checkpoint, shard by shard (a shard is made in memory, then saved)."""
    from build_mxfp4 import EXPERT_PARAMS, QUANT, pack
    from safetensors.torch import save_file

    if (path / "config.json").exists():
        return
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = _meta_model()
    gen = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, meta in model.state_dict().items():
        if name.rpartition(".")[2] in EXPERT_PARAMS:
            blocks, scales = pack(tuple(meta.shape), gen)
            tensors = {name + "_blocks": blocks, name + "_scales": scales}
        elif "norm" in name:
            tensors = {name: torch.ones(meta.shape, dtype=torch.bfloat16)}
        else:
            tensors = {name: torch.randn(meta.shape, generator=gen).mul_(0.02).to(torch.bfloat16)}
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1].update(tensors)
        size += nbytes
    weight_map = {}
    for n, shard in enumerate(shards):
        file = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(tmp / file), {"format": "pt"})
        weight_map.update({k: file for k in shard})
    shards.clear()
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = model.config.to_dict()
    config.update(architectures=["GptOssForCausalLM"], dtype="bfloat16", quantization_config=QUANT)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tmp.rename(path)


def build_adapter(path: Path) -> None:
    """PEFT's LoRA layout for the model, with seeded noise in every tensor (PEFT's zero lora_B changes nothing)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file

    if (path / "adapter_config.json").exists():
        return
    lora = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    peft_model = get_peft_model(_meta_model(), lora)
    gen = torch.Generator().manual_seed(1)
    tensors = {name: torch.randn(meta.shape, generator=gen) * 0.01
               for name, meta in get_peft_model_state_dict(peft_model).items()}
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "adapter_model.safetensors"), {"format": "pt"})
    peft_model.peft_config["default"].save_pretrained(str(tmp))
    tmp.rename(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, help="where each run writes its output (default <work>/out)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    base, dense, adapter = (args.work / name for name in ("base-1b-mxfp4", "base-1b-mxfp4-dense", "lora-1b-mxfp4"))
    adaptools_cmd = [sys.executable, "-m", "adaptools"]
    print(f"building {base}, {dense} and {adapter} (cached) ...", file=sys.stderr)
    build_base(base)
    build_adapter(adapter)
    if not (dense / "config.json").exists():
        tmp = dense.with_name(dense.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run([*adaptools_cmd, "dequantize", str(base), str(tmp)], check=True, stdout=subprocess.DEVNULL)
        tmp.rename(dense)
    out = args.out or args.work / "out"
    contenders = {
        "cp -r (dense base)": ["cp", "-r", str(dense), str(out)],
        "cp -r (MXFP4 base)": ["cp", "-r", str(base), str(out)],
        "adaptools dequantize": [*adaptools_cmd, "dequantize", str(base), str(out), "--json"],
        "adaptools merge (dequantize-merge)": [*adaptools_cmd, "merge", str(base), str(adapter), str(out), "--json"],
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
    }
    results, profiles = run_interleaved(contenders, out, args.repeat)
    sizes = {p.name: sum(f.stat().st_size for f in p.glob("*.safetensors")) / 1e9 for p in (dense, base)}
    print_against_dense_cp(results, profiles, f"dense base {sizes[dense.name]:.2f} GB, MXFP4 base "
                                              f"{sizes[base.name]:.2f} GB; medians of {args.repeat}")


if __name__ == "__main__":
    main()
