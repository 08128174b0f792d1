"""Split GGUF models (llama.cpp's ``gguf-split`` layout): the parts of a set found and checked from its first
part, and the names and metadata keys of the parts adaptools writes.

A model split in N parts is N GGUF files named ``PREFIX-00001-of-0000N.gguf`` ... ``PREFIX-0000N-of-0000N.gguf``.
Every part carries ``split.no`` (its 0-based number), ``split.count`` (N) and ``split.tensors.count`` (the
tensors of the whole set); the first part also carries every other metadata key, and each part holds its own
tensors, whose offsets count from its own data section. llama.cpp loads a set from its first part only and
finds the others by that naming (docs/gguf.md, "Split models"); adaptools does the same, and refuses a set
whose parts do not agree before anything is read from their tensors.
"""

from __future__ import annotations

import re
from pathlib import Path

import gguf

from adaptools.plugin import InputError

from .codec import scalar
from .fields import Header, open_header

SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS = (gguf.Keys.Split.LLM_KV_SPLIT_NO, gguf.Keys.Split.LLM_KV_SPLIT_COUNT,
                                        gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)
#: The metadata keys of a split set: not copied from a split base into an output, which writes its own.
KEYS = frozenset({SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS})
#: A part's name, as llama.cpp's ``llama_split_path`` and gguf-py's ``SHARD_NAME_FORMAT`` write it.
_PART = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
#: ``split.count`` is a UINT16: the most parts a set can have.
MAX_PARTS = 65535
REDOWNLOAD = "the parts come from different sets or one is corrupt; download the whole set again"


def part_name(prefix: str, no: int, count: int) -> str:
    """The file name of part ``no`` (0-based) of ``count``: ``PREFIX-00001-of-00003.gguf`` for the first."""
    return f"{prefix}-{no + 1:05d}-of-{count:05d}.gguf"


def part_names(name: str, count: int) -> list[str]:
    """The parts of an output named ``name`` (``out.gguf``), as gguf-py names them: its stem, then the part
    numbers; one part keeps the output's name."""
    if count == 1:
        return [name]
    stem = Path(name).stem
    return [part_name(stem, i, count) for i in range(count)]


def open_parts(first: Path, reader: Header) -> list[tuple[Path, Header]]:
    """Every part of the set that ``first`` (opened as ``reader``) begins, in order, each checked to belong
    to it: ``[(first, reader)]`` for a file that is not split. Raises one InputError naming the part at
    fault: another part given first, a part missing, a part of another set, tensors that do not add up."""
    count = scalar(reader, SPLIT_COUNT, int, first, required=False)
    if count is None or count <= 1:
        return [(first, reader)]
    no = scalar(reader, SPLIT_NO, int, first, required=False)
    if no is None:
        raise InputError(f"the file says it is one part of a GGUF model split in {count} ({SPLIT_COUNT}), but not "
                         f"which ({SPLIT_NO} is missing)", path=first, hint=REDOWNLOAD)
    if count > MAX_PARTS:
        raise InputError(f"GGUF metadata {SPLIT_COUNT} is {count}, more parts than a set can have", path=first)
    match = _PART.match(first.name)
    prefix = match["prefix"] if match else None
    if no != 0:
        hint = (f"open the set by its first part, {part_name(prefix, 0, count)}" if prefix
                else "open the set by its first part (PREFIX-00001-of-...gguf)")
        raise InputError(f"this is part {no + 1} of a GGUF model split in {count}", path=first, hint=hint)
    if prefix is None or first.name != part_name(prefix, 0, count):
        raise InputError(f"the first part of a GGUF model split in {count} is not named "
                         f"PREFIX-00001-of-{count:05d}.gguf, which is how llama.cpp finds the other parts",
                         path=first, hint="rename the parts as llama-gguf-split wrote them")
    total = scalar(reader, SPLIT_TENSORS, int, first)
    parts = [(first, reader)]
    for i in range(1, count):
        path = first.with_name(part_name(prefix, i, count))
        if not path.is_file():
            raise InputError(f"part {i + 1} of this GGUF model split in {count} is missing", path=path,
                             hint="put every part of the set beside the first")
        part = open_header(path)
        said = tuple(scalar(part, key, int, path, required=False) for key in (SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS))
        if said != (i, count, total):
            raise InputError(f"not part {i + 1} of this set: its {SPLIT_NO}, {SPLIT_COUNT}, {SPLIT_TENSORS} are "
                             f"{', '.join(str(v) for v in said)}, the first part's {i}, {count}, {total}",
                             path=path, hint=REDOWNLOAD)
        parts.append((path, part))
    held = sum(len(part.tensors) for _, part in parts)
    if held != total:
        raise InputError(f"the parts hold {held} tensors; the first part says the set has {total} "
                         f"({SPLIT_TENSORS})", path=first, hint=REDOWNLOAD)
    return parts
