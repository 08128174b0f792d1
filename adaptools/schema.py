"""The canonical adapter schema, version 1: the one shape every format is read into.

An :class:`Adapter` is a method name, that method's JSON config, a reference to the base model, provenance,
and a set of tensors named ``<module path as in the base checkpoint>.<role>`` (for example
``model.layers.0.self_attn.q_proj.lora_A``). Roles never contain a dot, so the module path of any tensor
is everything before its last dot. Tensors are read lazily, one at a time, from whatever store holds them.

On disk the schema is one ``.safetensors`` file whose header metadata holds the fields below; see
``docs/schema.md`` and the JSON Schema in ``adaptools/schema-v1.json``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Protocol

import torch

from .errors import InputError
from .jsonio import check_json, parse_json
from .safetensors_io import TORCH_TO_CODE, SafetensorsFile

SCHEMA_VERSION = 1

#: Header metadata keys of a schema file.
META_SCHEMA = "adaptools.schema"
META_METHOD = "adaptools.method"
META_CONFIG = "adaptools.config"
META_BASE = "adaptools.base"
META_PROVENANCE = "adaptools.provenance"


@dataclass(frozen=True)
class BaseRef:
    """Which base model an adapter was trained on: a hub name or a local path, plus revision and hash."""

    name: str | None = None
    revision: str | None = None
    sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "revision": self.revision, "sha256": self.sha256}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BaseRef:
        return cls(name=data.get("name"), revision=data.get("revision"), sha256=data.get("sha256"))


@dataclass(frozen=True)
class StoredTensorInfo:
    """Dtype (safetensors code, e.g. ``F32``) and shape of a tensor, known without reading it."""

    dtype: str
    shape: tuple[int, ...]


class TensorStore(Protocol):
    """Where an adapter's tensors live. Implementations read lazily."""

    def names(self) -> list[str]: ...

    def info(self, name: str) -> StoredTensorInfo: ...

    def get(self, name: str) -> torch.Tensor: ...

    def origin(self, name: str) -> tuple[str, str]:
        """(file, key in that file) the tensor came from, for error messages."""
        ...


class MemoryStore:
    """Tensors already in memory (adapters built in code, or produced by an operation)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], origin: str = "<memory>",
                 keys: Mapping[str, str] | None = None):
        self._tensors = dict(tensors)
        self._origin = origin
        self._keys = dict(keys or {})

    def names(self) -> list[str]:
        return list(self._tensors)

    def info(self, name: str) -> StoredTensorInfo:
        t = self._tensors[name]
        return StoredTensorInfo(TORCH_TO_CODE[t.dtype], tuple(t.shape))

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def origin(self, name: str) -> tuple[str, str]:
        return self._origin, self._keys.get(name, name)


class FileStore:
    """Tensors in one or more safetensors files, under canonical names mapped to the files' own keys."""

    def __init__(self, mapping: Mapping[str, tuple[SafetensorsFile, str]]):
        self._mapping = dict(mapping)

    def names(self) -> list[str]:
        return list(self._mapping)

    def info(self, name: str) -> StoredTensorInfo:
        file, key = self._mapping[name]
        info = file.info(key)
        return StoredTensorInfo(info.dtype, info.shape)

    def get(self, name: str) -> torch.Tensor:
        file, key = self._mapping[name]
        return file.get(key)

    def origin(self, name: str) -> tuple[str, str]:
        file, key = self._mapping[name]
        return str(file.path), key

    def source_key(self, name: str) -> str:
        return self._mapping[name][1]


def split_name(name: str) -> tuple[str, str]:
    """Split a canonical tensor name into (module path, role)."""
    module, _, role = name.rpartition(".")
    return module, role


@dataclass
class Adapter:
    """An adapter in the canonical schema.

    Attributes:
        method: the registered method name that understands the tensors and config (``"lora"``).
        config: the method's config, JSON-serialisable. Its shape is the method's business.
        tensors: a lazy :class:`TensorStore` holding ``<module>.<role>`` tensors.
        base: the base model the adapter belongs to.
        provenance: free-form JSON: which tool made it, from what.
        source: where it was read from, for messages.
        read_format: the name of the format it was read from.
    """

    method: str
    config: dict[str, Any]
    tensors: TensorStore
    base: BaseRef = field(default_factory=BaseRef)
    provenance: dict[str, Any] = field(default_factory=dict)
    source: str = "<memory>"
    schema_version: int = SCHEMA_VERSION
    read_format: str | None = None  # the format it was read from, set by ``load``

    def tensor_names(self) -> list[str]:
        return self.tensors.names()

    def tensor(self, name: str) -> torch.Tensor:
        return self.tensors.get(name)

    def info(self, name: str) -> StoredTensorInfo:
        return self.tensors.info(name)

    def where(self, name: str) -> dict[str, str]:
        """``path=`` and ``tensor=`` keyword arguments for an error about tensor ``name``."""
        path, key = self.tensors.origin(name)
        return {"path": path, "tensor": key}

    def modules(self) -> dict[str, dict[str, str]]:
        """Module path -> {role: canonical tensor name}, in first-seen order."""
        grouped: dict[str, dict[str, str]] = {}
        for name in self.tensor_names():
            module, role = split_name(name)
            grouped.setdefault(module, {})[role] = name
        return grouped

    def module_tensors(self, module: str) -> dict[str, torch.Tensor]:
        """All tensors of one module, read now, keyed by role."""
        return {role: self.tensor(name) for role, name in self.modules().get(module, {}).items()}

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.tensor_names():
            yield name, self.tensor(name)

    def num_parameters(self) -> int:
        total = 0
        for name in self.tensor_names():
            n = 1
            for d in self.info(name).shape:
                n *= d
            total += n
        return total

    def metadata(self) -> dict[str, str]:
        """The header metadata of this adapter as a schema file."""
        return {
            "format": "pt",
            META_SCHEMA: str(self.schema_version),
            META_METHOD: self.method,
            META_CONFIG: json.dumps(self.config, sort_keys=True),
            META_BASE: json.dumps(self.base.to_json(), sort_keys=True),
            META_PROVENANCE: json.dumps(self.provenance, sort_keys=True),
        }


@functools.cache
def metadata_schema() -> dict[str, Any]:
    """The shipped JSON Schema of schema-file metadata (``adaptools/schema-v1.json``, docs/schema.md)."""
    schema: dict[str, Any] = json.loads(resources.files("adaptools").joinpath("schema-v1.json").read_text(
        encoding="utf-8"))
    return schema


def parse_metadata(metadata: Mapping[str, str], path: object) -> tuple[int, str, dict[str, Any], BaseRef,
                                                                          dict[str, Any]]:
    """Validate schema-file header metadata; return (version, method, config, base, provenance).

    The metadata and each JSON document in it are checked against ``adaptools/schema-v1.json`` and read
    with the limits of :func:`adaptools.jsonio.parse_json` (finite numbers, bounded depth and size).
    """
    missing = [k for k in (META_SCHEMA, META_METHOD, META_CONFIG) if k not in metadata]
    if missing:
        raise InputError(f"not an adaptools schema file: header metadata lacks {', '.join(missing)}", path=path)
    schema = metadata_schema()
    check_json(dict(metadata), {k: v for k, v in schema.items() if k != "$defs"}, path=path,
               what="header metadata", hint="the file is corrupt or was not written by adaptools")
    version = int(metadata[META_SCHEMA])
    if version > SCHEMA_VERSION:
        raise InputError(f"schema version {version} is newer than this adaptools understands ({SCHEMA_VERSION})",
                         path=path, hint="upgrade adaptools")
    decoded = {}
    for key in (META_CONFIG, META_BASE, META_PROVENANCE):
        value = parse_json(metadata.get(key, "{}"), path=path, what=f"metadata {key}",
                           hint="the file is corrupt or was not written by adaptools")
        if not isinstance(value, dict):
            raise InputError(f"metadata {key} must be a JSON object", path=path)
        check_json(value, schema["$defs"][key], path=path, what=f"metadata {key}",
                   hint="the file is corrupt or was not written by adaptools")
        decoded[key] = value
    return (version, metadata[META_METHOD], decoded[META_CONFIG], BaseRef.from_json(decoded[META_BASE]),
            decoded[META_PROVENANCE])
