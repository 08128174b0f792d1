"""Benchmark ``adaptools merge BASE.gguf ADAPTER OUT.gguf`` against ``cp`` of the base.

Builds (once, cached under --work) a synthetic Llama GGUF file in Q8_0 with TinyLlama-1.1B's shapes (about
1.1B parameters, 1.2 GB; norms in F32, a 32000-token vocabulary in the metadata) and the r=16 PEFT LoRA on
every linear layer that benchmarks/merge.py uses, then runs each contender --repeat times, interleaved (the
first ``cp`` also warms the page cache), and prints median wall time, peak RSS and CPU time (user + sys,
less noisy on a shared machine) with ratios against ``cp`` measured in the same run, and where the merge's
time went (the engine profile from ``merge --json``).

    python benchmarks/gguf_merge.py                 # 1.1B Q8_0, 3 repeats
    python benchmarks/gguf_merge.py --json results.json
    python benchmarks/gguf_merge.py --header-only   # planning's header read: gguf-py's reader vs open_header
    python benchmarks/gguf_merge.py --out /tmp/x.gguf  # the output elsewhere (a --work shared by two checkouts)

(Named gguf_merge.py: a script named gguf.py would shadow the gguf package it imports.)

Every linear weight changes, so this is the heavy case: about 90% of the file is decoded, merged and
re-encoded by gguf-py; the embedding, the output and the norms are copied byte for byte.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge as dense  # noqa: E402  (the dense benchmark's shapes, adapter and timer)


def synthetic_writer(path: Path, cfg: dict, name: str, file_type: gguf.LlamaFileType) -> gguf.GGUFWriter:
    """A gguf-py writer at ``path`` holding a Llama model's metadata for ``cfg`` (benchmarks/merge.py's shapes)
    and a vocabulary of that size; the caller adds the tensors."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(2048)
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    writer.add_file_type(file_type)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"<t{i}>" for i in range(cfg["vocab_size"])])
    writer.add_token_scores([0.0] * cfg["vocab_size"])
    writer.add_token_types([1] * cfg["vocab_size"])
    return writer


def build_base(path: Path, cfg: dict) -> None:
    """The synthetic checkpoint of benchmarks/merge.py's shapes as one Q8_0 GGUF file, written a tensor at a
    time with gguf-py."""
    from adaptools_plugins.gguf import arch as gguf_arch

    if path.exists():
        return
    model = gguf_arch.ModelShape(gguf_arch.family_for_arch("llama"), n_blocks=cfg["num_hidden_layers"])
    tensors = [(model.gguf_name(name), shape) for name, shape in dense.shapes(cfg)]
    tmp = path.with_name(path.name + ".tmp")
    writer = synthetic_writer(tmp, cfg, "synthetic TinyLlama-1.1B shapes", gguf.LlamaFileType.MOSTLY_Q8_0)
    for name, shape in tensors:
        if len(shape) == 1:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), 4 * shape[0])
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, Q.Q8_0)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=Q.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    gen = torch.Generator().manual_seed(0)
    for name, shape in tensors:
        if len(shape) == 1:
            writer.write_tensor_data(np.ones(shape, dtype=np.float32))
        else:
            values = torch.randn(shape, generator=gen).mul_(0.02).numpy()
            writer.write_tensor_data(gguf.quants.quantize(values, Q.Q8_0))
    writer.close()
    tmp.rename(path)


#: CPU seconds (user + sys, the command and its children) of each run, by command: less noisy than wall time
#: on a machine shared with other work.
CPU: dict[tuple[str, ...], list[float]] = {}


def measure(cmd: list[str], out: Path, profile: dict | None = None) -> tuple[float, int]:
    """benchmarks/merge.py's timer for a command whose output is one file, noting its CPU time in :data:`CPU`."""
    import resource

    out.unlink(missing_ok=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        return dense.measure(cmd, out, profile)
    finally:
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        CPU.setdefault(tuple(cmd), []).append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        out.unlink(missing_ok=True)


def header_reads(base: Path, repeat: int) -> dict[str, float]:
    """Median seconds to read the base's header as planning read it before (gguf-py's ``GGUFReader``, which
    builds a view for every vocabulary item) and does now (``fields.open_header``: arrays kept as bytes), in
    this process, same run."""
    import time

    from adaptools_plugins.gguf.fields import open_header

    times: dict[str, list[float]] = {"gguf-py GGUFReader (before)": [], "open_header (now)": []}
    for _ in range(repeat):
        for name, read in (("gguf-py GGUFReader (before)", gguf.GGUFReader), ("open_header (now)", open_header)):
            start = time.perf_counter()
            read(base)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("benchmarks/.work"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--header-only", action="store_true", help="only the header reads (no merge, no cp)")
    parser.add_argument("--out", type=Path, help="where the merge and cp write (default: <work>/out.gguf; deleted "
                                                  "after each run)")
    args = parser.parse_args()
    cfg = dense.SIZES["1b"]
    args.work.mkdir(parents=True, exist_ok=True)
    base, adapter = args.work / "base-1b-q8_0.gguf", args.work / "lora-1b"
    print(f"building {base} and {adapter} (cached) ...", file=sys.stderr)
    build_base(base, cfg)
    dense.build_adapter(adapter, cfg)
    headers = header_reads(base, args.repeat)
    print(f"header read of the base for planning (medians of {args.repeat}): "
          + ", ".join(f"{name} {seconds:.3f} s" for name, seconds in headers.items())
          + f"; {headers['gguf-py GGUFReader (before)'] / headers['open_header (now)']:.0f}x faster")
    if args.header_only:
        return
    out = args.out or args.work / "out.gguf"
    import adaptools

    print(f"adaptools from {Path(adaptools.__file__).parent}", file=sys.stderr)  # which checkout is measured
    adaptools_cmd = [sys.executable, "-m", "adaptools"]
    contenders = {
        "cp (Q8_0 base)": ["cp", str(base), str(out)],
        "adaptools merge (GGUF Q8_0)": [*adaptools_cmd, "merge", str(base), str(adapter), str(out), "--json"],
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
        "adaptools --version": [*adaptools_cmd, "--version"],
    }
    results, profiles = dense.run_interleaved(contenders, out, args.repeat, measure)  # cp first: warms the cache
    cp = results["cp (Q8_0 base)"]["wall_s"]
    torch_s = results['python -c "import torch"']["wall_s"]
    print(f"\nbase: {base.stat().st_size / 1e9:.2f} GB Q8_0; r=16 LoRA on every linear layer; medians of {args.repeat}")
    print(f"{'contender':30s} {'wall s':>8s} {'x cp':>8s} {'work s':>8s} {'work x cp':>10s} {'peak RSS GiB':>13s} "
          f"{'CPU s':>7s}")
    for name, r in results.items():
        work = r["wall_s"] - torch_s if name.startswith("adaptools") else r["wall_s"]
        r["work_s"] = work
        r["cpu_s"] = statistics.median(CPU[tuple(contenders[name])][-args.repeat:])  # (the warm-up run is first)
        print(f"{name:30s} {r['wall_s']:8.2f} {r['wall_s'] / cp:8.2f} {work:8.2f} {work / cp:10.2f} "
              f"{r['peak_rss_bytes'] / 2**30:13.2f} {r['cpu_s']:7.2f}")
    for name, runs in profiles.items():
        if runs:
            median = {k: statistics.median(p.get(k, 0.0) for p in runs) for k in runs[0]}
            results[name]["profile"] = median
            parts = ", ".join(f"{k} {median[k]:.2f}" for k in ("plan", "read", "compute", "encode",
                                                              "write_background", "finalize") if k in median)
            print(f"  {name}: start-up and imports {median['wall'] - median['engine'] - median.get('plan', 0):.2f} s;"
                  f" {parts} (seconds, medians)")
    if args.json:
        args.json.write_text(json.dumps({"bytes": base.stat().st_size, "results": results, "header_reads": headers},
                                        indent=2))


if __name__ == "__main__":
    main()
