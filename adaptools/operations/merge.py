"""Merge adapters into a dense base checkpoint, streaming one tensor at a time.

The plan is made from headers before any weight is read: every adapter's method turns its tensors into
per-parameter :class:`TensorUpdate` s against the base's :class:`BaseInfo`, so a missing module or a shape
mismatch is refused before anything is written. Then each output shard is written header-first: touched
tensors are read with a plain read, decoded to fp32, updated, rounded once to the output dtype and
written; untouched tensors are copied byte for byte by the kernel. Peak memory is the largest tensor (a
few copies of it in fp32) plus the adapters, whatever the model size.

Tied embeddings: when ``lm_head.weight`` is not stored because it is tied to the input embedding, the two
are computed separately from the shared tensor. If they come out equal they stay tied (a delta that
appears on both, as with peft's ``ensure_weight_tying``, is applied once); otherwise an explicit
``lm_head.weight`` is written and ``tie_word_embeddings`` set to false, matching the unmerged model.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import registry
from ..checkpoint import INDEX, Checkpoint, Shard
from ..errors import IncompatibleBaseError, InputError
from ..interfaces import Backend, BaseTensor, TensorUpdate
from ..outputs import atomic_output, check_output, terminate_as_exception
from ..safetensors_io import (
    DTYPES,
    TORCH_TO_CODE,
    DeferredSafetensorsWriter,
    SafetensorsWriter,
    TensorSpec,
    read_header,
)
from ..schema import Adapter
from ..version import __version__
from .quantized import (
    QuantizedPlan,
    QuantizeOptions,
    plan_quantize,
    plan_requantize,
    quantization_config,
    write_quantized_shard,
)

DTYPE_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CONFIG_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
#: Update kinds that change the stored tensor itself, so a tied alias (lm_head) sees them too.
STORAGE_KINDS = ("replace", "replace_rows")
#: Threads that stream blocks of a large tensor on CPU.
WORKERS = max(1, min(4, os.cpu_count() or 1))
KIND_ORDER = {"replace": 0, "replace_module": 0, "delta": 1, "replace_rows": 2, "output_map": 3}


@dataclass
class MergeInput:
    """One adapter to merge and its weight (its deltas are multiplied by it)."""

    adapter: Adapter
    weight: float = 1.0


@dataclass(frozen=True)
class MergeEvent:
    """Progress: one output tensor written."""

    tensor: str
    shard: str
    nbytes: int
    merged: bool
    total_bytes: int = 0  # what the whole output will hold (an estimate for 4-bit output), for progress bars


@dataclass
class MergeSummary:
    output: str
    tensors: int = 0
    tensors_merged: int = 0
    tensors_copied: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    shards: int = 0
    untied_lm_head: bool = False
    vocab_size: int | None = None
    warnings: list[str] = field(default_factory=list)
    survival: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _adapter_files(adapter: Adapter) -> list[Path]:
    src = Path(adapter.source)
    if not src.exists():  # built in memory
        return []
    if src.is_file():
        return [src]
    return sorted(p for p in src.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".bin"))


def _hub_sha256(path: Path) -> str | None:
    """A hub cache snapshot file is a link to ``blobs/<sha256>`` for LFS files: the hash comes for free."""
    if path.is_symlink():
        target = os.path.basename(os.readlink(path))
        if len(target) == 64 and all(c in "0123456789abcdef" for c in target):
            return target
    return None


def _check_architecture(adapter: Adapter, checkpoint: Checkpoint) -> None:
    mapping = adapter.config.get("auto_mapping") or {}
    wanted = mapping.get("base_model_class") if isinstance(mapping, dict) else None
    architectures = checkpoint.config.get("architectures") or []
    if wanted and architectures and wanted not in architectures:
        raise IncompatibleBaseError(
            f"the adapter was trained on {wanted}, the base is {', '.join(architectures)}", path=adapter.source,
            hint="pass --ignore-base-mismatch if you are sure")


def plan_updates(inputs: Sequence[MergeInput], checkpoint: Checkpoint,
                 ignore_base_mismatch: bool = False) -> dict[str, list[TensorUpdate]]:
    """Every adapter's updates, grouped by base parameter, validated against the base's headers."""
    info = checkpoint.base_info()
    grouped: dict[str, list[TensorUpdate]] = {}
    replaced_by: dict[str, str] = {}
    for item in inputs:
        method = registry.get_method(item.adapter.method)
        method.require("merge")
        if not ignore_base_mismatch:
            _check_architecture(item.adapter, checkpoint)
        for update in method.merge_updates(item.adapter, info, item.weight):
            if update.kind in ("replace", "replace_module"):
                if update.target in replaced_by and replaced_by[update.target] != item.adapter.source:
                    raise IncompatibleBaseError(
                        f"two adapters replace {update.target} ({replaced_by[update.target]} and "
                        f"{item.adapter.source})", hint="merge them separately or drop one")
                replaced_by[update.target] = item.adapter.source
            grouped.setdefault(update.target, []).append(update)
    return grouped


def _ordered(updates: list[TensorUpdate]) -> list[TensorUpdate]:
    return sorted(updates, key=lambda u: KIND_ORDER.get(u.kind, 1))


def _apply(updates: list[TensorUpdate], original: torch.Tensor) -> torch.Tensor:
    """Run a parameter's updates in order; ``original`` is never modified."""
    chain = _ordered(updates)
    current = original.clone() if any(u.needs_original for u in chain) or not chain else original
    for update in chain:
        current = update.fn(current, original)
    return current


def _blockable(device: str, like: BaseTensor, chain: list[TensorUpdate], *backends: Backend | None) -> bool:
    """Whether a parameter can be merged block of rows by block (:func:`_merge_blocked`): on the CPU, a
    matrix, every update able to work on rows, and backends that decode and encode element by element."""
    return (device == "cpu" and len(like.shape) >= 2 and all(u.rows is not None for u in chain)
            and all(b is not None and b.elementwise for b in backends))


def _row_step(shape: tuple[int, ...]) -> int:
    """Rows per block so that a block of fp32 stays in cache (~256 KiB); a multiple of 16 rows, which
    keeps blocked matrix products bit-identical to whole ones (tests/test_merge_blocks.py)."""
    cols = 1
    for d in shape[1:]:
        cols *= d
    return 16 * max(1, (1 << 16) // (16 * max(cols, 1)))


def _merge_blocked(stored: torch.Tensor, chain: list[TensorUpdate], decode: Backend, encode: Backend,
                   like: BaseTensor, out_dtype: torch.dtype, workers: int = 1) -> torch.Tensor:
    """Decode, update and encode a tensor block of rows by block, so the fp32 working set stays in cache.

    ``workers`` threads each take a contiguous range of blocks (torch releases the GIL in its kernels).
    Elementwise backends encode by casting, so each block is cast straight into the output.
    """
    out = torch.empty(stored.shape, dtype=out_dtype)
    step = _row_step(tuple(stored.shape))
    total = stored.shape[0]
    blocks = list(range(0, total, step))

    def run(starts: list[int]) -> None:
        for start in starts:
            rows = slice(start, start + step)
            current = decode.decode(stored[rows])
            for update in chain:
                current = update.rows(current, rows)  # type: ignore[misc]
            out[rows].copy_(current)

    if workers <= 1 or len(blocks) < 2 * workers:
        run(blocks)
        return out
    per = -(-len(blocks) // workers)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(run, blocks[i:i + per]) for i in range(0, len(blocks), per)]:
            future.result()
    return out


@contextmanager
def _single_threaded_torch() -> Iterator[None]:
    """Small per-block kernels run faster on one thread each; we parallelise over blocks instead."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _Codec:
    """Picks the backend that decodes each stored tensor, and the one that encodes the output."""

    def __init__(self, dtype: str, checkpoint_config: dict[str, Any]):
        self.backends: list[Backend] = [e.obj for e in registry.backends().values()]
        self.config = checkpoint_config
        self.forced = registry.get_backend(dtype) if dtype != "auto" else None

    def backend(self, tensor: BaseTensor) -> Backend | None:
        for backend in self.backends:
            if backend.claims(tensor, self.config):
                return backend
        return None

    def output_dtype(self, tensor: BaseTensor) -> str:
        if self.forced is not None and self.backend(tensor) is not None:
            return TORCH_TO_CODE[DTYPE_NAMES[self.forced.name]]
        return tensor.dtype

    def encoder(self, tensor: BaseTensor) -> Backend:
        backend = self.forced if self.forced is not None else self.backend(tensor)
        if backend is None:
            raise InputError(f"no backend stores dtype {tensor.dtype}", tensor=tensor.name)
        return backend

    def encode(self, dense: torch.Tensor, tensor: BaseTensor) -> torch.Tensor:
        return self.encoder(tensor).encode(dense, tensor)


def merge(base: str | os.PathLike[str], inputs: Sequence[MergeInput], out: str | os.PathLike[str], *,
          dtype: str = "auto", device: str = "cpu", shard_size: int | None = None, force: bool = False,
          ignore_base_mismatch: bool = False, hash_base: bool = False, command: str | None = None,
          progress: Callable[[MergeEvent], None] | None = None, operation: str = "merge",
          requantize: bool = False, quantize: QuantizeOptions | None = None) -> MergeSummary:
    """Merge ``inputs`` into the checkpoint ``base`` and write a checkpoint folder at ``out``.

    Args:
        base: a local checkpoint folder or a hub reference.
        inputs: adapters (already loaded and validated) with weights.
        out: the output folder; written to a temporary sibling and renamed into place at the end.
        dtype: ``auto`` (each tensor keeps the base's dtype) or ``fp32``/``fp16``/``bf16``.
        device: where the fp32 arithmetic runs (``cpu`` or ``cuda``).
        shard_size: re-shard the output to at most this many bytes per file (default: the base's layout).
        force: replace an existing ``out``.
        ignore_base_mismatch: merge even if the adapter names another architecture.
        hash_base: record the sha256 of local base shards (costs a full extra read).
        command: the command line, recorded in provenance.
        progress: called once per written tensor.
        operation: recorded in provenance; ``"dequantize"`` also requires a quantized base.
        requantize: keep a 4-bit base's weights 4-bit (changed ones re-encoded with their own settings,
            untouched ones copied byte for byte); the summary reports how much of each change survived.
        quantize: quantize a dense base's linear weights to 4-bit with these options.

    Raises:
        AdaptoolsError subclasses for anything the user can fix; nothing is written then.
    """
    started = time.perf_counter()
    check_output(out, force)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda asked for, but torch sees no CUDA device", hint="use --device cpu")
    if dtype != "auto" and dtype not in DTYPE_NAMES:
        raise InputError(f"unknown dtype {dtype!r}", hint="use auto, fp32, fp16 or bf16")
    checkpoint = Checkpoint.open(base)
    codec = _Codec(dtype, checkpoint.config)
    if operation == "dequantize" and not checkpoint.groups:
        raise InputError("no quantized weights here: nothing to dequantize", path=checkpoint.path,
                         hint="expected a bitsandbytes 4-bit checkpoint (quant_state.bitsandbytes__nf4 tensors)")
    quantized: QuantizedPlan | None = None
    if requantize or quantize is not None:
        if shard_size is not None or dtype != "auto":
            raise InputError("4-bit output keeps the base's shard layout and dtypes",
                             hint="drop --shard-size and --dtype")
        quantized = (plan_requantize(checkpoint) if requantize
                     else plan_quantize(checkpoint, registry.get_backend(quantize.quant_type), quantize))
    updates = plan_updates(inputs, checkpoint, ignore_base_mismatch)
    for target in updates:
        stored_name = checkpoint.aliases.get(target, target)
        if stored_name in checkpoint.location and codec.backend(checkpoint.tensor(stored_name)) is None:
            raise InputError(f"cannot merge into a {checkpoint.tensor(stored_name).dtype} tensor: no backend "
                             "decodes it", path=checkpoint.location[stored_name][0].path, tensor=target)
    summary = MergeSummary(output=str(out))

    precomputed, extra, untie = _plan_tied(checkpoint, updates, codec, device)
    summary.untied_lm_head = untie
    layout = _layout(checkpoint, extra, shard_size)
    specs, new_shapes = _specs(checkpoint, updates, extra, precomputed, codec)
    provenance = _provenance(checkpoint, inputs, command, hash_base, operation)
    metadata = {"format": "pt", "adaptools.provenance": json.dumps(provenance, sort_keys=True)}

    total = sum(spec.nbytes for spec in specs.values())
    if progress is not None:
        user_progress = progress

        def progress(event: MergeEvent) -> None:
            user_progress(MergeEvent(event.tensor, event.shard, event.nbytes, event.merged, total))

    threads = _single_threaded_torch() if device == "cpu" else nullcontext()
    if quantized is not None:
        with terminate_as_exception(), atomic_output(out, force=force) as tmp, threads:
            _write_quantized(tmp, checkpoint, quantized, updates, precomputed, extra, codec, device, metadata,
                             summary, progress)
            config = dict(checkpoint.config)
            if untie:
                config["tie_word_embeddings"] = False
            if quantize is not None:
                compute = next(iter(quantized.targets.values()))[1]["dtype"]
                config["quantization_config"] = quantization_config(
                    quantize, CONFIG_DTYPE_NAMES[compute], quantize.skip_modules)
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            for path in checkpoint.other_files():
                shutil.copyfile(path, tmp / path.name)
            _write_card(tmp, provenance)
        summary.survival = [s.__dict__ for s in quantized.survival]
        summary.seconds = time.perf_counter() - started
        summary.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return summary
    with terminate_as_exception(), atomic_output(out, force=force) as tmp, threads:
        for shard_name, names in layout.items():
            shard_specs = {name: specs[name] for name in names}
            handles: dict[Path, Any] = {}
            try:
                with SafetensorsWriter(tmp / shard_name, shard_specs, metadata, background=True) as writer:
                    _write_shard(writer, names, checkpoint, updates, precomputed, extra, codec, device, summary,
                                 shard_name, progress, handles)
            finally:
                for fh in handles.values():
                    fh.close()
        _write_index(tmp, layout, specs, multi=len(layout) > 1 or checkpoint.index is not None)
        vocab = _write_config(tmp, checkpoint, codec, dtype, untie, new_shapes)
        summary.vocab_size = vocab
        for path in checkpoint.other_files():
            shutil.copyfile(path, tmp / path.name)
        _write_card(tmp, provenance)
        summary.shards = len(layout)
    summary.seconds = time.perf_counter() - started
    summary.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return summary


def _write_quantized(tmp: Path, checkpoint: Checkpoint, plan: QuantizedPlan, updates: dict[str, list[TensorUpdate]],
                     precomputed: dict[str, torch.Tensor], extra: dict[str, tuple[str, torch.Tensor]], codec: _Codec,
                     device: str, metadata: dict[str, str], summary: MergeSummary,
                     progress: Callable[[MergeEvent], None] | None) -> None:
    """4-bit output: every shard of the base, in its own order, through the quantized shard writer."""
    weight_map: dict[str, str] = {}

    def dense_value(name: str, keep_original: bool = False) -> Any:
        """The merged value of a parameter about to be encoded (and, for the survival report, the decoded
        original). Row-blocked where the updates allow it, as in the dense merge: full-size fp32 copies
        of every layer cost more than the arithmetic; the encoder rounds to the stored dtype either way."""
        like = checkpoint.tensor(name)
        stored = checkpoint.read(name)
        chain = _ordered(updates.get(name, []))
        decoder = codec.backend(like)
        if chain and _blockable(device, like, chain, decoder):
            with _single_threaded_torch():
                merged = _merge_blocked(stored, chain, decoder, decoder, like, stored.dtype, WORKERS)
        else:
            merged = _apply(chain, stored.to(device).float()).cpu()
        return (merged, stored) if keep_original else merged

    for shard in checkpoint.shards:
        names = sorted(shard.header.tensors, key=lambda n: shard.header.tensors[n].begin)
        names += [alias for alias, (after, _) in extra.items() if after in names]
        handles: dict[Path, Any] = {}

        def write_dense(writer: DeferredSafetensorsWriter, name: str) -> int:
            if name in extra or name in precomputed:
                value = extra[name][1] if name in extra else precomputed[name]
            else:
                like = checkpoint.tensor(name)
                if name not in updates and codec.output_dtype(like) == like.dtype:
                    shard_, info = checkpoint.location[name]
                    fh = handles.get(shard_.path) or handles.setdefault(shard_.path, open(shard_.path, "rb"))
                    writer.copy_range(name, fh, info.begin, info.nbytes, TensorSpec(info.dtype, info.shape))
                    return info.nbytes
                value = codec.encode(dense_value(name), like)
            writer.write(name, value)
            return value.numel() * value.element_size()

        def on_tensor(name: str, nbytes: int, merged: bool, _shard: str = shard.name) -> None:
            summary.tensors += 1
            summary.bytes_written += nbytes
            summary.tensors_merged += int(merged)
            summary.tensors_copied += int(not merged)
            if progress is not None:
                progress(MergeEvent(name, _shard, nbytes, merged))

        try:
            write_quantized_shard(tmp / shard.name, names, checkpoint, plan, updates, dense_value, write_dense,
                                  metadata, on_tensor)
        finally:
            for fh in handles.values():
                fh.close()
        for name in read_header(tmp / shard.name).tensors:
            weight_map[name] = shard.name
    summary.shards = len(checkpoint.shards)
    if checkpoint.index is not None:
        total = sum(info.nbytes for shard in checkpoint.shards
                    for info in read_header(tmp / shard.name).tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _plan_tied(checkpoint: Checkpoint, updates: dict[str, list[TensorUpdate]], codec: _Codec,
               device: str) -> tuple[dict[str, torch.Tensor], dict[str, tuple[str, torch.Tensor]], bool]:
    """Resolve tied parameters now: (precomputed results, extra tensors {name: (after, value)}, untied?)."""
    precomputed: dict[str, torch.Tensor] = {}
    extra: dict[str, tuple[str, torch.Tensor]] = {}
    untie = False
    for alias, stored in checkpoint.aliases.items():
        if alias not in updates and stored not in updates:
            continue
        like = checkpoint.tensor(stored)
        original = checkpoint.read(stored).to(device).float()
        stored_result = codec.encode(_apply(updates.get(stored, []), original.clone()), like).cpu()
        alias_updates = [u for u in updates.get(stored, []) if u.kind in STORAGE_KINDS] + updates.get(alias, [])
        alias_result = codec.encode(_apply(alias_updates, original), like).cpu()
        precomputed[stored] = stored_result
        if not torch.equal(stored_result, alias_result):
            extra[alias] = (stored, alias_result)
            untie = True
        updates.pop(alias, None)
    return precomputed, extra, untie


def _layout(checkpoint: Checkpoint, extra: dict[str, tuple[str, torch.Tensor]],
            shard_size: int | None) -> dict[str, list[str]]:
    """Output shard name -> tensor names in write order (the base's layout, or re-sharded)."""
    ordered: list[tuple[Shard, str]] = []
    for shard in checkpoint.shards:
        names = sorted(shard.header.tensors, key=lambda n: shard.header.tensors[n].begin)
        for name in names:
            if name in checkpoint.companions:  # parts of a quantized parameter, written dense as one
                continue
            ordered.append((shard, name))
            for alias, (after, _) in extra.items():
                if after == name:
                    ordered.append((shard, alias))
    if shard_size is None:
        layout: dict[str, list[str]] = {}
        for shard, name in ordered:
            layout.setdefault(shard.name, []).append(name)
        return layout
    groups: list[list[str]] = [[]]
    size = 0
    for _, name in ordered:
        if name in extra:
            nbytes = extra[name][1].numel() * extra[name][1].element_size()
        else:
            nbytes = TensorSpec(checkpoint.tensor(name).dtype, checkpoint.tensor(name).shape).nbytes
        if groups[-1] and size + nbytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    if len(groups) == 1:
        return {"model.safetensors": groups[0]}
    return {f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors": g for i, g in enumerate(groups)}


def _specs(checkpoint: Checkpoint, updates: dict[str, list[TensorUpdate]],
           extra: dict[str, tuple[str, torch.Tensor]], precomputed: dict[str, torch.Tensor],
           codec: _Codec) -> tuple[dict[str, TensorSpec], dict[str, tuple[int, ...]]]:
    specs: dict[str, TensorSpec] = {}
    new_shapes: dict[str, tuple[int, ...]] = {}
    for name in checkpoint.location:
        if name in checkpoint.companions:
            continue
        like = checkpoint.tensor(name)
        shape = like.shape
        if name in precomputed:
            shape = tuple(precomputed[name].shape)
        for update in updates.get(name, []):
            if update.shape is not None:
                shape = tuple(update.shape)
        if shape != like.shape:
            new_shapes[name] = shape
        specs[name] = TensorSpec(codec.output_dtype(like), shape)
    for alias, (_, value) in extra.items():
        specs[alias] = TensorSpec.of(value)
        new_shapes[alias] = tuple(value.shape)
    return specs, new_shapes


def _write_shard(writer: SafetensorsWriter, names: list[str], checkpoint: Checkpoint,
                 updates: dict[str, list[TensorUpdate]], precomputed: dict[str, torch.Tensor],
                 extra: dict[str, tuple[str, torch.Tensor]], codec: _Codec, device: str, summary: MergeSummary,
                 shard_name: str, progress: Callable[[MergeEvent], None] | None, handles: dict[Path, Any]) -> None:
    """Write one output shard. ``handles`` are open source files, closed by the caller after the writer
    has drained (its background thread may still be copying from them)."""
    for name in names:
        merged = False
        if name in extra:
            value = extra[name][1]
            writer.write(name, value)
            nbytes, merged = value.numel() * value.element_size(), True
        else:
            shard, info = checkpoint.location[name]
            src = handles.get(shard.path)
            if src is None:
                src = handles[shard.path] = open(shard.path, "rb")
            like = checkpoint.tensor(name)
            grouped = name in checkpoint.groups
            if name in precomputed:
                value = precomputed.pop(name)
                writer.write(name, value)
                nbytes, merged = value.numel() * value.element_size(), True
            elif name in updates:
                chain = _ordered(updates[name])
                decoder, encoder = codec.backend(like), codec.encoder(like)
                stored = checkpoint.read(name, src)
                if _blockable(device, like, chain, decoder, encoder):
                    out_dtype = DTYPES[codec.output_dtype(like)][0]
                    value = _merge_blocked(stored, chain, decoder, encoder, like, out_dtype, WORKERS)
                else:
                    original = decoder.decode(stored.to(device))  # type: ignore[union-attr]
                    value = codec.encode(_apply(chain, original), like).cpu()
                    del original
                writer.write(name, value)
                nbytes, merged = value.numel() * value.element_size(), True
                del stored, value
            elif codec.output_dtype(like) == info.dtype and not grouped:
                writer.copy_range(name, src, info.begin, info.nbytes)
                nbytes = info.nbytes
            elif grouped and codec.output_dtype(like) == like.dtype:
                value = checkpoint.read(name, src)  # decoded straight to its dense dtype
                writer.write(name, value)
                nbytes = value.numel() * value.element_size()
            else:
                value = codec.encode(checkpoint.read(name, src).float(), like)
                writer.write(name, value)
                nbytes = value.numel() * value.element_size()
        summary.tensors += 1
        summary.bytes_written += nbytes
        if merged:
            summary.tensors_merged += 1
        else:
            summary.tensors_copied += 1
        if progress is not None:
            progress(MergeEvent(name, shard_name, nbytes, merged))


def _write_index(tmp: Path, layout: dict[str, list[str]], specs: dict[str, TensorSpec], multi: bool) -> None:
    if not multi or len(layout) == 1 and "model.safetensors" in layout:
        return
    weight_map = {name: shard for shard, names in layout.items() for name in names}
    total = sum(specs[name].nbytes for name in weight_map)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _write_config(tmp: Path, checkpoint: Checkpoint, codec: _Codec, dtype: str, untie: bool,
                  new_shapes: dict[str, tuple[int, ...]]) -> int | None:
    config = dict(checkpoint.config)
    if dtype != "auto":
        name = CONFIG_DTYPE_NAMES[DTYPE_NAMES[dtype]]
        for key in ("dtype", "torch_dtype"):
            if key in config or key == "dtype":
                config[key] = name
    if untie:
        config["tie_word_embeddings"] = False
    vocab = None
    embedding = checkpoint.aliases.get("lm_head.weight")
    for name, shape in new_shapes.items():
        if name.endswith(("embed_tokens.weight", "wte.weight", "word_embeddings.weight")) or name == embedding:
            vocab = shape[0]
    if vocab is not None:
        config["vocab_size"] = vocab
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return vocab


def _provenance(checkpoint: Checkpoint, inputs: Sequence[MergeInput], command: str | None,
                hash_base: bool, operation: str) -> dict[str, Any]:
    base_files = []
    for shard in checkpoint.shards:
        sha = _hub_sha256(shard.path) or (_sha256(shard.path) if hash_base else None)
        base_files.append({"file": shard.name, "bytes": shard.path.stat().st_size, "sha256": sha})
    adapters = []
    for item in inputs:
        adapters.append({
            "source": item.adapter.source,
            "method": item.adapter.method,
            "weight": item.weight,
            "base": item.adapter.base.to_json(),
            "files": [{"file": p.name, "sha256": _sha256(p)} for p in _adapter_files(item.adapter)],
        })
    return {"tool": f"adaptools {__version__}", "operation": operation, "command": command,
            "base": {"path": str(checkpoint.path), "files": base_files}, "adapters": adapters}


def _write_card(tmp: Path, provenance: dict[str, Any]) -> None:
    base = provenance["base"]["path"]
    adapters = "\n".join(f"- `{a['source']}` ({a['method']}, weight {a['weight']})" for a in provenance["adapters"])
    what = (f"by merging into `{base}`:\n\n{adapters}" if adapters
            else f"by {provenance['operation']} of `{base}` (dense weights, no quantization_config).")
    text = (f"---\nbase_model: {base}\nlibrary_name: transformers\ntags:\n- adaptools\n- {provenance['operation']}\n"
            f"---\n\n# {provenance['operation'].capitalize()}d model\n\nMade by {provenance['tool']} {what}\n\n"
            f"Command: `{provenance['command'] or '(library call)'}`\n\n"
            "The full provenance (input hashes) is in each .safetensors file's metadata under "
            "`adaptools.provenance`.\n")
    (tmp / "README.md").write_text(text, encoding="utf-8")
