"""``adaptools convert``: read any format into the schema and write it in another."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from ..adapter_io import load, save
from ..errors import InputError
from ..finite import count_nonfinite
from ..interfaces import Bakeable, PlainConvertible, WriteOptions, capability
from ..outputs import check_output
from ..schema import Adapter
from ..version import __version__


def convert(ref: str | os.PathLike[str], out: str | os.PathLike[str], *, to: str = "schema", force: bool = False,
            allow_pickle: bool = False, bake: bool = False, base: str | None = None,
            outtype: str | None = None) -> Path:
    """Load ``ref`` (validated) and write it to ``out`` in format ``to``; nothing is written on error.

    ``bake`` first evaluates training-time parts into what is served (a prefix's projection MLP).
    ``base`` and ``outtype`` go to formats that need them (GGUF: the architecture and the tensor type);
    ``base`` also helps formats that need it to read (a GGUF LoRA without head counts).
    """
    from .. import registry

    check_output(out, force, [ref], directory=registry.get_format(to).writes_directory)
    adapter = load(ref, allow_pickle=allow_pickle, base=base)
    if bake:
        baked = capability(registry.get_method(adapter.method), "bake", Bakeable, adapter).bake(adapter)
        _refuse_nonfinite_bake(adapter, baked)
        adapter = baked
    provenance = dict(adapter.provenance)
    provenance.setdefault("converted_by", f"adaptools {__version__}")
    adapter = replace(adapter, provenance=provenance)
    return save(adapter, out, format=to, force=force, options=WriteOptions(base=base, outtype=outtype))


def _refuse_nonfinite_bake(source: Adapter, baked: Adapter) -> None:
    """Evaluating an encoder (P-tuning's MLP or LSTM, a prefix projection) can overflow where every stored
    weight is finite: refuse to write that (docs/outputs.md, "Never garbage")."""
    for name in baked.tensor_names():
        bad = count_nonfinite(baked.tensor(name))
        if bad and not any(count_nonfinite(source.tensor(n)) for n in source.tensor_names()):
            raise InputError(f"baking would write {bad} non-finite value(s) (NaN or infinity) from finite weights: "
                             "the encoder overflows", path=source.source, tensor=name,
                             hint="the training checkpoint is corrupt or diverged; use a checkpoint saved by "
                                  "peft, which holds the baked prompts already")


def convert_method(ref: str | os.PathLike[str], out: str | os.PathLike[str], *, base: str | None = None,
                   initial: str | None = None, to_format: str | None = None, force: bool = False,
                   allow_pickle: bool = False, to_method: str | None = None, rank: int | None = None,
                   energy: float | None = None) -> tuple[Path, dict[str, float] | None]:
    """Write ``ref`` in its method's plain form (OLoRA/PiSSA -> LoRA of rank 2r on the original base; AdaLoRA,
    LoHa, LoKr -> LoRA). With ``rank`` or ``energy`` each module is then truncated by SVD (as ``resize``);
    returns the path and, when truncated, each module's retained share of ‖ΔW‖²."""
    from .. import registry
    from ..checkpoint import Checkpoint
    from ..errors import UnsupportedOperationError
    from .algebra import resize

    check_output(out, force, [ref, *(p for p in (base, initial) if p)])
    adapter = load(ref, allow_pickle=allow_pickle)
    method = capability(registry.get_method(adapter.method), "plain", PlainConvertible, adapter)
    info = read = None
    if base is not None:
        checkpoint = Checkpoint.open(base)
        info, read = checkpoint.base_info(), checkpoint.read
    first = load(initial, allow_pickle=allow_pickle) if initial else None
    plain = method.to_plain(adapter, info, read, first)
    if to_method is not None and plain.method != to_method:
        raise UnsupportedOperationError(f"method {adapter.method!r} converts to {plain.method!r}, not {to_method!r}",
                                        path=ref)
    retained = None
    if rank is not None or energy is not None:
        plain, retained = resize(plain, rank=rank, energy=energy)
    return save(plain, out, format=to_format or adapter.read_format or "schema", force=force), retained



def with_initial(adapter: Adapter, initial: Adapter) -> Adapter:
    """An adapter trained on a modified base, as its plain form on the original base, using the adapter
    saved right after init (``merge --initial``)."""
    from .. import registry

    method = capability(registry.get_method(adapter.method), "plain", PlainConvertible, adapter)
    return method.to_plain(adapter, None, None, initial)
