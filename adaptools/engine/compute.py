"""Stage 2 of the engine: materialise one planned entry (decode, apply the update chain, encode).

A matrix whose updates can work on rows is streamed through the CPU cache a block of rows at a time,
the blocks shared out over every core; anything else is computed whole on the merge device. Either way
the result is rounded once to the output dtype, and checked: a merge never writes a NaN or an infinity
where the base had a finite value (docs/merge-engine.md, "Never garbage").
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..checkpoint import Checkpoint
from ..errors import InputError
from ..finite import count_nonfinite
from ..interfaces import Backend, BaseTensor, TensorUpdate, UpdateKind
from ..packed import KINDS, add_rounded, packed_available
from ..safetensors_io import DTYPES
from .entries import CAST, Entry
from .quantized import Survival, survival, survival_norms
from .source import BufferPool, Reader


@dataclass
class Produced:
    """What an entry produced: tensors to write in order, and what to give back once they are written."""

    tensors: dict[str, torch.Tensor]
    pooled: list[torch.Tensor] = field(default_factory=list)
    survival: Survival | None = None


def row_step(shape: Sequence[int]) -> int:
    """Rows per block: about 256 Ki fp32 elements (1 MiB), a multiple of 16 rows, which keeps blocked matrix
    products bit-identical to whole ones (tests/test_merge_blocks.py).

    Each block costs a dozen torch calls whose dispatch holds the GIL, so small blocks serialise the
    threads; large ones fall out of cache. Measured on the synthetic 1.1B merge (compute seconds, two runs
    each, 2 threads): 2^15 elements 5.3-5.8, 2^16 3.7-4.0, 2^17 2.8-2.9, 2^18 2.2, 2^19 2.0-2.2, 2^20
    2.7-3.1, 2^22 6.1-6.3."""
    cols = 1
    for d in shape[1:]:
        cols *= d
    return 16 * max(1, BLOCK_ELEMENTS // (16 * max(cols, 1)))


#: fp32 elements per row block (see :func:`row_step`).
BLOCK_ELEMENTS = 1 << 18


def blockable(entry: Entry, device: str) -> bool:
    """Whether an entry can be computed block of rows by block: on the CPU, a matrix whose shape does not
    change, every update able to work on rows, backends that decode and encode element by element."""
    coders: list[Backend | None] = [entry.decoder, entry.encoder]
    return (device == "cpu" and len(entry.shape) >= 2 and all(u.rows is not None for u in entry.chain)
            and all(b is not None and b.elementwise for b in coders)
            and all(u.shape is None for u in entry.chain))


def apply_chain(chain: Sequence[TensorUpdate], original: torch.Tensor) -> torch.Tensor:
    """Run a parameter's updates in order on a whole tensor; ``original`` is never modified."""
    current = original.clone() if any(u.needs_original for u in chain) or not chain else original
    for update in chain:
        current = update.fn(current, original)
    return current


class NonFiniteError(InputError):
    """A merge would write NaN or infinity where the base has a finite value."""


def check_finite(entry: Entry, out: torch.Tensor, source: Callable[[], torch.Tensor | None],
                 what: str | None = None) -> None:
    """Refuse an output that holds a non-finite value the base did not hold at the same place.

    The common case costs one sum: a finite sum means every element is finite. Only a non-finite sum
    (or an overflowing one) pays for the element-wise comparison with the decoded source.
    """
    if not count_nonfinite(out):
        return
    bad = ~torch.isfinite(out)
    original = source()
    if original is not None and original.shape == out.shape:
        bad &= torch.isfinite(original.to(bad.device))
    count = int(bad.sum())
    if count:
        sources = what or "; ".join(u.source for u in entry.chain if u.source) or "a dtype cast"
        raise NonFiniteError(
            f"the result would hold {count} non-finite value(s) (NaN or infinity) where the base is finite "
            f"(from {sources})", tensor=entry.name,
            hint="the adapter's factors, scale or --weight overflow; check it with `adaptools check`, or keep a "
                 "wider --dtype")


def decode_rows(decoder: Backend | None, stored: torch.Tensor, rows: slice) -> torch.Tensor | None:
    """The decoded source rows (for the rare element-wise comparison of :func:`check_finite`)."""
    return decoder.decode(stored[rows]) if decoder is not None else None


def merge_rows(entry: Entry, stored: torch.Tensor, out: torch.Tensor, threads: ThreadPoolExecutor | None = None,
               workers: int = 1) -> None:
    """Compute ``entry`` into ``out`` a block of rows at a time, the blocks shared over ``workers`` threads
    (torch releases the GIL in its kernels). Bit-identical to the whole-tensor computation.

    Each thread decodes into, and takes each update's delta in, two scratch blocks of its own, allocated
    once per entry: a fresh 1 MiB tensor per block is a fresh mapping whose pages fault in on first touch,
    which cost as much as the arithmetic (docs/merge-engine.md, "Blocks of rows")."""
    step = row_step(tuple(stored.shape))
    starts = list(range(0, stored.shape[0], step))
    decoder = entry.decoder
    chain = entry.chain
    per_row = stored[:1].numel()
    # one delta added to a plain cast: widening, the addition, the rounding and the finite check in one pass
    # of the C kernel (adaptools_packed_add), which gives torch's bits for every finite result
    fused = (len(chain) == 1 and chain[0].row_delta is not None and chain[0].kind == UpdateKind.DELTA
             and packed_available() and stored.dtype in KINDS and out.dtype in KINDS
             and stored.is_contiguous() and out.is_contiguous())

    def run(block_starts: Sequence[int]) -> None:
        if chain:  # elementwise decoders are plain casts: decoded straight into the scratch block
            size = min(step, stored.shape[0]) * per_row
            decoded = torch.empty(size, dtype=torch.float32)
            scratch = torch.empty(size, dtype=torch.float32) if any(
                u.row_delta is not None and u.kind == UpdateKind.DELTA for u in chain) else None
        for start in block_starts:
            rows = slice(start, start + step)
            block = stored[rows]
            if fused:
                shape = tuple(block.shape)
                delta = chain[0].row_delta(rows, scratch[:block.numel()].view(shape))  # type: ignore[index,misc]
                if not add_rounded(block, delta, out[rows]):
                    continue  # every result finite: nothing to check
                # a NaN or infinity: the torch steps again, so that its bits (NaN payloads) are torch's
                current = decoded[:block.numel()].view(shape).copy_(block)
                out[rows].copy_(current.add_(delta))
            elif chain:
                shape = tuple(block.shape)
                current = decoded[:block.numel()].view(shape).copy_(block)
                for update in chain:
                    if scratch is not None and update.row_delta is not None and update.kind == UpdateKind.DELTA:
                        current.add_(update.row_delta(rows, scratch[:block.numel()].view(shape)))
                    else:
                        current = update.rows(current, rows)  # type: ignore[misc]
                out[rows].copy_(current)
            else:  # elementwise backends encode by casting: no fp32 copy for a plain cast
                out[rows].copy_(block)
            check_finite(entry, out[rows], functools.partial(decode_rows, decoder, stored, rows))

    if threads is None or workers <= 1 or len(starts) < 2 * workers:
        run(starts)
        return
    per = -(-len(starts) // workers)
    futures = [threads.submit(run, starts[i:i + per]) for i in range(0, len(starts), per)]
    errors = []
    for future in futures:
        try:
            future.result()
        except BaseException as exc:  # wait for every thread before the buffers are reused
            errors.append(exc)
    if errors:
        raise errors[0]


class Compute:
    """Materialises entries, sharing the row blocks of each over a pool of threads."""

    def __init__(self, checkpoint: Checkpoint, reader: Reader, pool: BufferPool, device: str, workers: int):
        self.checkpoint = checkpoint
        self.reader = reader
        self.pool = pool
        self.device = device
        self.workers = max(1, workers)
        self.seconds = {"compute": 0.0, "encode": 0.0}  # for the profile
        self._threads = ThreadPoolExecutor(self.workers, thread_name_prefix="adaptools-merge") \
            if self.workers > 1 else None

    def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown()

    def __call__(self, entry: Entry, source: tuple[torch.Tensor, bool] | None = None) -> Produced:
        """Materialise ``entry``; ``source`` is its stored value if already read (by a prefetcher)."""
        return self.start(entry, source)()

    def start(self, entry: Entry, source: tuple[torch.Tensor, bool] | None = None) -> Callable[[], Produced]:
        """Compute ``entry``'s dense value now and return what finishes it: nothing more for a dense entry,
        the encoding for a quantized group. The caller may run that on another thread (one at a time, in
        entry order) while this one computes the next entry: encoding is single-threaded, the dense
        arithmetic uses every core, and overlapping the two is what keeps ``--requantize`` near a plain merge."""
        stored, pooled = source if source is not None else self.reader.read(entry.source)
        parts = self.reader.stored_parts(entry.source)  # the group's stored bytes, if it was one
        started = time.perf_counter()
        handed_on = False
        try:
            if entry.group is None:
                out = self._dense(entry, stored, entry.encoder, DTYPES[entry.dtype][0])
                if out is stored and pooled:  # written as read (a group decoded to its own dtype): the writer
                    handed_on = True  # gives the reader's buffer back once written, not the reader now
                produced = Produced({entry.name: out}, [out] if out is not stored or pooled else [])
                return lambda: produced
            if entry.chain:
                merged = self._dense(entry, stored, entry.decoder, DTYPES[entry.dtype][0])
            else:
                merged = stored
                check_finite(entry, merged, lambda: None)

            def finish() -> Produced:
                try:
                    return self._encode(entry, stored, merged, parts)
                finally:
                    if merged is not stored:
                        self.pool.give(merged)
                    self.reader.release(stored, pooled)

            handed_on = True
            return finish
        finally:
            self.seconds["compute"] += time.perf_counter() - started
            if not handed_on:
                self.reader.release(stored, pooled)

    def _dense(self, entry: Entry, stored: torch.Tensor, encoder: Backend | None, dtype: torch.dtype) -> torch.Tensor:
        """The entry's dense value in ``dtype``: on a pooled buffer, or ``stored`` itself when nothing
        changes (a decoded group already in that dtype)."""
        if entry.action == CAST and not entry.chain and stored.dtype == dtype:
            check_finite(entry, stored, lambda: None)
            return stored
        if blockable(entry, self.device):
            out = self.pool.tensor(dtype, tuple(stored.shape))
            try:
                merge_rows(entry, stored, out, self._threads, self.workers)
            except BaseException:
                self.pool.give(out)
                raise
            return out
        like = BaseTensor(entry.source, entry.dtype, tuple(stored.shape))
        original = entry.decoder.decode(stored.to(self.device))  # type: ignore[union-attr]
        value = encoder.encode(apply_chain(entry.chain, original), like).cpu()  # type: ignore[union-attr]
        # the chain may have changed ``original`` in place: decode the stored value again (rare path)
        check_finite(entry, value, lambda: entry.decoder.decode(stored.to(self.device)))  # type: ignore[union-attr]
        return value

    def _encode(self, entry: Entry, stored: torch.Tensor, merged: torch.Tensor,
                parts: dict[str, torch.Tensor] | None = None) -> Produced:
        """A parameter encoded as a backend's group (a quantized weight), from its merged dense value, with
        the report of how much of the change survived; ``parts`` are the stored tensors the base's group was
        decoded from, when the reader kept them (else the report reads them)."""
        assert entry.group is not None
        started = time.perf_counter()
        try:
            backend, settings = entry.group.backend, entry.group.settings
            # encoded and decoded again in one call: a backend whose codec gives back each block's decoded
            # values as it encodes it saves a pass over the tensor (Backend.encode_group_decoded)
            lent = self.pool.tensor(merged.dtype, tuple(merged.shape))  # for the decoded values
            try:
                group, written = backend.encode_group_decoded(entry.name, merged, settings, lent)
                report = self._check_written(entry, stored, merged, group, written, parts)
            finally:
                self.pool.give(lent)
        finally:
            self.seconds["encode"] += time.perf_counter() - started
        return Produced(group, survival=report)

    def _check_written(self, entry: Entry, stored: torch.Tensor, merged: torch.Tensor, group: dict[str, torch.Tensor],
                       written: torch.Tensor, parts: dict[str, torch.Tensor] | None) -> Survival | None:
        """Refuse a group whose decoded values are not finite where ``merged`` was, and report how much of the
        change survived (None when the entry asks for no report)."""
        # the report's norms first: ‖written − merged‖ is finite only if every written value is
        norms = survival_norms(merged, stored, written) if entry.survival else None
        # What is written, decoded again, is finite wherever its source was: the rule every encoder
        # inherits (a Q8_0 block scale or an F16 value beyond fp16's range, a 4-bit group whose dtype
        # cannot hold its scale). docs/outputs.md, "Never garbage". A finite norm proves it without the
        # check's own pass over the tensor; anything else takes the check.
        if norms is None or not math.isfinite(norms[2]):
            check_finite(entry, written, lambda: merged, what="its encoding")
        report = None
        if entry.survival:
            main = self.checkpoint.anchors.get(entry.name, entry.name)  # the stored tensor the codes are in
            before = parts[main] if parts and main in parts else self.checkpoint.read_small(main)
            report = survival(entry.name, before, merged, stored, group, written, main, norms)
        return report


def dense_value(entry: Entry, checkpoint: Checkpoint, device: str) -> torch.Tensor:
    """An entry's dense output computed on its own, whole (the plan uses it to decide ties)."""
    pool = BufferPool()
    with Reader(checkpoint, pool) as reader:
        compute = Compute(checkpoint, reader, pool, device, workers=1)
        try:
            produced = compute(entry)
            return produced.tensors[entry.name].clone()
        finally:
            compute.close()
