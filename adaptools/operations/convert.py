"""``adaptools convert``: read any format into the schema and write it in another."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from ..adapter_io import load, save
from ..outputs import check_output
from ..version import __version__


def convert(ref: str | os.PathLike[str], out: str | os.PathLike[str], *, to: str = "schema", force: bool = False,
            allow_pickle: bool = False) -> Path:
    """Load ``ref`` (validated) and write it to ``out`` in format ``to``; nothing is written on error."""
    check_output(out, force)
    adapter = load(ref, allow_pickle=allow_pickle)
    provenance = dict(adapter.provenance)
    provenance.setdefault("converted_by", f"adaptools {__version__}")
    adapter = replace(adapter, provenance=provenance)
    return save(adapter, out, format=to, force=force)
