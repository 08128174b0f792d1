"""Load any supported adapter into the schema, and save the schema to any writable format.

Which format a path is in is decided by the registered formats' ``detect``; which method its tensors
follow is recorded in the adapter and checked by that method's ``validate`` before anything else runs.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import registry
from .errors import AdaptoolsError, InputError, UnknownPluginError
from .finite import count_nonfinite
from .interfaces import AdapterFormat, ReadOptions, WriteOptions
from .outputs import atomic_output
from .resolve import resolve
from .schema import Adapter

ADAPTER_FILE_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*/*.json", "*/*.safetensors", "*/*.bin", "*.md"]


def detect_format(path: Path) -> str:
    """Name of the registered format that recognises ``path``."""
    for name, entry in registry.formats().items():
        if entry.obj.can_read and entry.obj.detect(path):
            return name
    if path.is_dir():
        raise InputError("no adapter found in this directory", path=path,
                         hint="expected adapter_config.json with adapter_model.safetensors, or a schema file")
    raise InputError("not a recognised adapter file", path=path,
                     hint=f"readable formats: {', '.join(sorted(registry.formats()))}")


def load(ref: str | os.PathLike[str], *, format: str | None = None, allow_pickle: bool = False,
         validate: bool = True, base: str | None = None) -> Adapter:
    """Read an adapter from a local path or a hub reference into the canonical schema.

    Args:
        ref: a directory, a file, ``org/name`` or ``org/name@revision``.
        format: force a format instead of detecting it.
        allow_pickle: allow ``adapter_model.bin`` (read with ``torch.load(weights_only=True)``).
        validate: check the tensors against the config and for NaN/Inf (recommended; ``check`` turns it off
            to report every problem as a finding instead of stopping at the first).
        base: the base model, for formats that need it to read (a GGUF LoRA without head counts).

    Raises:
        InputError: unreadable or inconsistent input, naming the file and tensor.
    """
    path = resolve(ref, allow_patterns=ADAPTER_FILE_PATTERNS, what="adapter")
    fmt_name = format or detect_format(path)
    fmt = registry.get_format(fmt_name)
    adapter = fmt.read(path, ReadOptions(allow_pickle=allow_pickle, validate=validate, base=base))
    adapter.read_format = fmt_name
    try:
        method = registry.get_method(adapter.method)
    except UnknownPluginError as exc:
        raise UnknownPluginError(f"adapter uses method {adapter.method!r}, which no installed plugin provides",
                                 path=path, hint=exc.hint) from None
    if validate:
        method.validate(adapter)
    return adapter


def save(adapter: Adapter, path: str | os.PathLike[str], *, format: str = "schema", force: bool = False,
         options: WriteOptions | None = None) -> Path:
    """Write ``adapter`` in ``format`` to ``path`` atomically (a temporary sibling renamed into place).

    ``options`` carries what some formats need to write (GGUF: the base and the output tensor type)."""
    fmt = registry.get_format(format)
    if not fmt.can_write:
        raise UnknownPluginError(f"format {format!r} cannot be written")
    options = options or WriteOptions()
    with atomic_output(path, force=force, directory=fmt.writes_directory) as tmp:
        fmt.write(adapter, tmp, options)
        if not any(count_nonfinite(adapter.tensor(name)) for name in adapter.tensor_names()):
            verify_written(fmt, tmp, options, Path(path))
    return Path(path)


def verify_written(fmt: AdapterFormat, written: Path, options: WriteOptions, final: Path) -> None:
    """Read back what ``fmt`` wrote, with the format's own reader, before it is published: it must read, and
    hold no NaN or infinity. :func:`save` asks this when the adapter it wrote was finite, so a non-finite
    value is the encoding's (a value beyond fp16's range, a scale folded over a tiny alpha); an adapter
    that already held NaN (a hostile file made on purpose, a test corpus) is written as it is. Every format
    inherits this; docs/outputs.md, "Never garbage"."""
    try:
        written_adapter = fmt.read(written, ReadOptions(validate=False, base=options.base))
    except AdaptoolsError:  # what the caller asked to be unreadable (a schema version from the future, a
        return             # hostile corpus); that real outputs read back is tests/test_hardening.py's property
    for name in written_adapter.tensor_names():
        bad = count_nonfinite(written_adapter.tensor(name))
        if bad:
            raise InputError(f"the {fmt.name} file would hold {bad} non-finite value(s) (NaN or infinity) in this "
                             "tensor, from finite inputs: its encoding overflows", path=final, tensor=name,
                             hint="write it in a wider type (--outtype f32), or check the adapter's scale "
                                  "(lora_alpha, alpha_pattern)")
