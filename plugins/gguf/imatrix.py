"""llama.cpp importance-matrix files (``--imatrix FILE``) as per-tensor weight vectors.

``llama-imatrix`` records, per weight tensor, the mean of each input column's squared activation; with it,
``llama-quantize --imatrix`` fits each block's scales to the columns that matter most. A merge given the same
file re-encodes its changed tensors with the same weights, so that their bytes are the ones llama-quantize
would write (docs/gguf.md, "Importance matrices", which also describes both file layouts read here: the
older binary ``.dat`` and the GGUF file of ``<name>.in_sum2`` / ``<name>.counts`` tensors).

The weights are exactly llama-quantize's: the sums divided by the call count (legacy) or by each expert's
rounded token count (GGUF; a count of zero gives weights of 1), in float32. Anything that could not have
come from ``llama-imatrix`` (a truncated file, a negative or non-finite value, sums without counts, two
entries of one name) is refused in one line naming the file and the entry.
"""

from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from adaptools.plugin import InputError

from .codec import open_reader  # the bounded, one-line-error reader of GGUF files

MAGIC = b"GGUF"
SUMS, COUNTS = ".in_sum2", ".counts"
#: The metadata llama-quantize requires of a GGUF imatrix (it refuses the file without all three).
REQUIRED_KEYS = ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")
#: Longest entry name accepted in a legacy file (llama.cpp's tensor names are at most 64 bytes).
MAX_NAME = 1 << 16
HINT = "make the file again with llama.cpp's llama-imatrix"


@dataclass(frozen=True)
class ImportanceMatrix:
    """One imatrix file: each entry's weights as float32 ``[experts, columns]`` (one row for a plain weight)."""

    path: Path
    weights: dict[str, np.ndarray]

    def for_tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
        """The weights of GGUF tensor ``name`` of numpy ``shape`` (``[experts,] rows, columns``), as
        llama-quantize takes them: None when the file has no entry (the tensor is encoded without weights,
        as llama-quantize does), refused when the entry's size is not columns x experts (llama-quantize
        refuses that too, except for the token embedding, which it encodes without weights)."""
        entry = self.weights.get(name)
        if entry is None:
            return None
        experts = shape[-3] if len(shape) >= 3 else 1
        if entry.size != shape[-1] * experts:
            if name.startswith("token_embd."):
                return None
            raise InputError(f"the imatrix entry has {entry.size} values, but the tensor has {shape[-1]} columns"
                             f"{f' x {experts} experts' if experts > 1 else ''}", path=self.path, tensor=name,
                             hint="the imatrix was made for another model; use the one made for this base")
        return entry.reshape(experts, shape[-1])


def load(path: str | Path) -> ImportanceMatrix:
    """Read ``path`` (GGUF or legacy layout, told apart by the GGUF magic), checked; cached per file
    version, since every changed tensor of a merge asks for it."""
    p = Path(path)
    try:
        stat = p.stat()
    except OSError as exc:
        raise InputError(f"cannot read the imatrix file ({exc.strerror})", path=p) from None
    return _load(p.resolve(), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _load(path: Path, mtime_ns: int, size: int) -> ImportanceMatrix:
    try:
        with open(path, "rb") as fh:
            gguf_file = fh.read(4) == MAGIC
    except OSError as exc:
        raise InputError(f"cannot read the imatrix file ({exc.strerror})", path=path) from None
    weights = _read_gguf(path) if gguf_file else _read_legacy(path)
    for name, w in weights.items():
        if not np.isfinite(w).all():
            raise InputError("the imatrix entry holds a NaN or infinite value", path=path, tensor=name, hint=HINT)
        if (w < 0).any():
            raise InputError("the imatrix entry holds a negative value (a mean of squares cannot be)", path=path,
                             tensor=name, hint=HINT)
    return ImportanceMatrix(path, weights)


def _bad(path: Path, message: str, name: str | None = None) -> InputError:
    return InputError(f"not a readable imatrix file: {message}", path=path, tensor=name, hint=HINT)


def _read_legacy(path: Path) -> dict[str, np.ndarray]:
    """The binary layout: int32 entry count; per entry int32 name length, the name, int32 call count, int32
    value count, the float32 sums (already divided by their token counts, times the call count); an
    optional trailer (chunk count, dataset name) that we do not need."""
    data = path.read_bytes()
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > len(data):
            raise _bad(path, f"it ends inside {what}")
        chunk = data[pos:pos + n]
        pos += n
        return chunk

    (entries,) = struct.unpack("<i", take(4, "the entry count"))
    if entries < 1:
        raise _bad(path, f"{entries} entries")
    out: dict[str, np.ndarray] = {}
    for i in range(entries):
        (length,) = struct.unpack("<i", take(4, f"entry {i + 1}'s name length"))
        if not 0 < length <= MAX_NAME:
            raise _bad(path, f"entry {i + 1} has a name of {length} bytes")
        try:
            name = take(length, f"entry {i + 1}'s name").decode()
        except UnicodeDecodeError:
            raise _bad(path, f"entry {i + 1}'s name is not UTF-8") from None
        ncall, nval = struct.unpack("<ii", take(8, f"entry {name}'s counts"))
        if nval < 1:
            raise _bad(path, f"{nval} values", name)
        if ncall < 0:
            raise _bad(path, f"a call count of {ncall}", name)
        sums = np.frombuffer(take(4 * nval, f"entry {name}'s values"), dtype="<f4").astype(np.float32)
        if name in out:
            raise _bad(path, "the entry is stored twice", name)
        with np.errstate(all="ignore"):  # non-finite results are refused by the caller, naming the entry
            out[name] = sums / np.float32(ncall) if ncall > 0 else sums
    return out


def _read_gguf(path: Path) -> dict[str, np.ndarray]:
    """The GGUF layout, through gguf-py: per entry ``<name>.in_sum2`` (F32, ``[experts, columns]``: each
    column's summed squared activations) and ``<name>.counts`` (F32, ``[experts, 1]``: the tokens summed)."""
    reader = open_reader(path)
    missing = [k for k in REQUIRED_KEYS if reader.get_field(k) is None]
    if missing:
        raise _bad(path, f"it is a GGUF file without the imatrix metadata {', '.join(missing)} (not an imatrix, "
                         "or one llama-quantize refuses too)")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        for suffix, into in ((SUMS, sums), (COUNTS, counts)):
            if t.name.endswith(suffix) and len(t.name) > len(suffix):
                name = t.name[:-len(suffix)]
                if t.tensor_type != gguf.GGMLQuantizationType.F32:
                    raise _bad(path, f"{t.name} is {t.tensor_type.name}, not F32", name)
                into[name] = np.asarray(t.data, dtype=np.float32).reshape(-1)
    if not sums and not counts:
        raise _bad(path, "it holds no .in_sum2 / .counts tensors")
    out: dict[str, np.ndarray] = {}
    for name in sorted(set(sums) | set(counts)):
        if name not in sums or name not in counts:
            raise _bad(path, f"{SUMS if name in counts else COUNTS} is missing for the entry", name)
        s, c = sums[name], counts[name]
        if c.size < 1 or s.size % c.size:
            raise _bad(path, f"{s.size} sums do not split into {c.size} experts", name)
        if not np.isfinite(c).all() or (c < 0).any():
            raise _bad(path, "a token count is negative or not finite", name)
        # each count rounded to the nearest integer, halves away from zero (llama.cpp's lround), then a float
        whole = np.array([float(math.floor(v + 0.5)) for v in c.tolist()], dtype=np.float32)
        per = s.reshape(c.size, -1)
        with np.errstate(all="ignore"):  # non-finite results are refused by the caller, naming the entry
            w = np.where(whole[:, None] > 0, per / np.where(whole > 0, whole, 1)[:, None], np.float32(1))
        out[name] = np.ascontiguousarray(w, dtype=np.float32).reshape(-1)
    return out
