"""``adaptools convert``: read any format into the schema and write it in another."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from ..adapter_io import load, save
from ..outputs import check_output
from ..version import __version__


def convert(ref: str | os.PathLike[str], out: str | os.PathLike[str], *, to: str = "schema", force: bool = False,
            allow_pickle: bool = False, bake: bool = False) -> Path:
    """Load ``ref`` (validated) and write it to ``out`` in format ``to``; nothing is written on error.

    ``bake`` first evaluates training-time parts into what is served (a prefix's projection MLP).
    """
    from .. import registry

    check_output(out, force)
    adapter = load(ref, allow_pickle=allow_pickle)
    if bake:
        adapter = registry.get_method(adapter.method).bake(adapter)
    provenance = dict(adapter.provenance)
    provenance.setdefault("converted_by", f"adaptools {__version__}")
    adapter = replace(adapter, provenance=provenance)
    return save(adapter, out, format=to, force=force)


def convert_method(ref: str | os.PathLike[str], out: str | os.PathLike[str], *, base: str | None = None,
                   initial: str | None = None, to_format: str = "peft", force: bool = False,
                   allow_pickle: bool = False, to_method: str | None = None, rank: int | None = None,
                   energy: float | None = None) -> tuple[Path, dict[str, float] | None]:
    """Write ``ref`` in its method's plain form (OLoRA/PiSSA -> LoRA of rank 2r on the original base; AdaLoRA,
    LoHa, LoKr -> LoRA). With ``rank`` or ``energy`` each module is then truncated by SVD (as ``resize``);
    returns the path and, when truncated, each module's retained share of ‖ΔW‖²."""
    from .. import registry
    from ..checkpoint import Checkpoint
    from ..errors import UnsupportedOperationError
    from .algebra import resize

    check_output(out, force)
    adapter = load(ref, allow_pickle=allow_pickle)
    info = read = None
    if base is not None:
        checkpoint = Checkpoint.open(base)
        info, read = checkpoint.base_info(), checkpoint.read
    first = load(initial, allow_pickle=allow_pickle) if initial else None
    plain = registry.get_method(adapter.method).to_plain(adapter, info, read, first)
    if to_method is not None and plain.method != to_method:
        raise UnsupportedOperationError(f"method {adapter.method!r} converts to {plain.method!r}, not {to_method!r}",
                                        path=ref)
    retained = None
    if rank is not None or energy is not None:
        plain, retained = resize(plain, rank=rank, energy=energy)
    return save(plain, out, format=to_format, force=force), retained


def initialize(base: str | os.PathLike[str], out: str | os.PathLike[str], *, method: str,
               options: dict[str, object], to_format: str = "peft", force: bool = False,
               write_base: str | None = None) -> Path:
    """A freshly initialised adapter (``adaptools init``), and optionally the residual base it trains on."""
    from .. import registry
    from ..checkpoint import Checkpoint
    from .merge import MergeInput, merge

    check_output(out, force)
    if write_base:
        check_output(write_base, force)
    checkpoint = Checkpoint.open(base)
    adapter = registry.get_method(method).initialize(checkpoint.base_info(), checkpoint.read, options)
    saved = save(adapter, out, format=to_format, force=force)
    if write_base:
        # The residual W - s·B0A0 is the init adapter merged with weight -1 as a plain adapter.
        plain = replace(adapter, config={**adapter.config, "init_lora_weights": True})
        merge(base, [MergeInput(plain, -1.0)], write_base, force=force, operation="init-residual")
    return saved
