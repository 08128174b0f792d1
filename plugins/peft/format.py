"""The PEFT adapter directory format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Reads any method that declares ``peft_types`` and ``peft_roles``; the key grammar is in docs/peft.md, "Tensor keys".
Named adapters saved by ``save_pretrained`` live in subfolders (``dir/<name>/``): pass that subfolder.
Legacy ``adapter_model.bin`` pickles are read only when allowed, and then only with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import adaptools
from adaptools import plugin
from adaptools.plugin import (
    Adapter,
    AdapterMethod,
    BaseRef,
    FileStore,
    InputError,
    MemoryStore,
    ReadOptions,
    SafetensorsFile,
    UnknownPluginError,
    UnsupportedOperationError,
    WriteOptions,
)

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLE = "adapter_model.bin"
PREFIX = "base_model.model."
BASE_FIELDS = ("base_model_name_or_path", "revision")
#: An adapter config is a few kilobytes; a larger one is not a config.
MAX_CONFIG_BYTES = 4 * 1024 * 1024
_TEXT = {"type": ["string", "null"], "maxLength": 4096, "description": "a string or null"}
#: Fields every PEFT config shares; each method declares and checks its own (docs/input-validation.md).
COMMON_SCHEMA = {"type": "object", "properties": {"peft_type": {"type": "string", "maxLength": 100},
                                                  "base_model_name_or_path": _TEXT, "revision": _TEXT,
                                                  "task_type": _TEXT}}


def method_for_peft_type(peft_type: str, path: Path) -> AdapterMethod:
    for entry in plugin.methods().values():
        if peft_type in entry.obj.peft_types:
            return entry.obj
    raise UnknownPluginError(f"PEFT type {peft_type!r} is not supported by any installed method plugin",
                             path=path / CONFIG, hint="install a plugin for it, see `adaptools plugins`")


def split_peft_key(key: str, peft_roles: dict[str, str]) -> tuple[str, str]:
    """A PEFT state-dict key -> (module path, canonical role), tolerating legacy spellings
    (docs/peft.md, "Legacy spellings")."""
    k = key[len(PREFIX):] if key.startswith(PREFIX) else key
    if k.endswith(".lora_magnitude_vector.weight"):
        k = k[: -len(".weight")]
    found = _match_role(k, peft_roles)
    if found is None:  # a leftover adapter name: `.lora_A.default.weight` -> `.lora_A.weight`
        heads = sorted({suffix.split(".")[0] for suffix in peft_roles}, key=len, reverse=True)
        if heads:
            stripped = re.sub(rf"\.({'|'.join(map(re.escape, heads))})\.[^.]+(?=\.weight$|\.bias$|$)", r".\1", k)
            if stripped.endswith(".lora_magnitude_vector.weight"):
                stripped = stripped[: -len(".weight")]
            found = _match_role(stripped, peft_roles)
    if found is not None:
        return found
    module, _, param = k.rpartition(".")
    module = ".".join(part for part in module.split(".") if part != "base_layer")
    return module, f"replace_{param}"


def _match_role(key: str, peft_roles: dict[str, str]) -> tuple[str, str] | None:
    for suffix in sorted(peft_roles, key=len, reverse=True):
        if key == suffix:  # prompt learning: model-level tensors with no module path
            return "", peft_roles[suffix]
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], peft_roles[suffix]
    return None


def peft_key(module: str, role: str, roles_to_suffix: dict[str, str], has_factors: bool) -> str:
    """The inverse of :func:`split_peft_key`, in the spelling peft itself writes."""
    if role.startswith("replace_"):
        infix = ".base_layer" if has_factors else ""
        return f"{PREFIX}{module}{infix}.{role[len('replace_'):]}"
    if not module:  # prompt learning tensors carry no prefix at all
        return roles_to_suffix[role]
    return f"{PREFIX}{module}.{roles_to_suffix[role]}"


#: File-level rules of a PEFT adapter directory (``adaptools check``).
FILE_RULES = {
    "AT001": ("warning", "weights are (also) a pickle: adapter_model.bin can run code when loaded"),
    "AT002": ("warning", "base_model_name_or_path is not recorded"),
    "AT003": ("info", "the base revision is not pinned"),
    "AT004": ("error", "weights only as a pickle: not inspected (pass --allow-pickle to read it)"),
}
FILE_FIXES = {
    "AT001": "publish adapter_model.safetensors only",
    "AT002": "set base_model_name_or_path in adapter_config.json",
    "AT003": "set revision in adapter_config.json to the base's commit",
    "AT004": "convert the weights to safetensors (adaptools convert --allow-pickle)",
}


def _finding(rule: str, message: str, file: Path, field: str | None = None) -> plugin.Finding:
    return plugin.Finding(rule, FILE_RULES[rule][0], message, FILE_FIXES[rule], str(file), None, field)


class PeftFormat(plugin.AdapterFormat):
    name = "peft"
    description = "PEFT adapter directory (adapter_config.json + adapter_model.safetensors)"

    def detect(self, path: Path) -> bool:
        if path.is_file() and path.name in (CONFIG, WEIGHTS, PICKLE):
            path = path.parent
        # AdapterHub directories also hold an adapter_config.json; their weights have other names.
        adapterhub = (path / "adapter.safetensors").is_file() or (path / "pytorch_adapter.bin").is_file()
        return path.is_dir() and (path / CONFIG).is_file() and not adapterhub

    def read(self, path: Path, options: ReadOptions) -> Adapter:
        if path.is_file():
            path = path.parent
        config_path = path / CONFIG
        if not config_path.exists() and not config_path.is_symlink():
            raise InputError("no adapter_config.json here", path=path)
        peft_config = plugin.read_json(config_path, what=CONFIG, max_bytes=MAX_CONFIG_BYTES)
        if not isinstance(peft_config, dict):
            raise InputError("must hold a JSON object", path=config_path)
        peft_type = peft_config.get("peft_type")
        if not isinstance(peft_type, str):
            raise InputError("has no peft_type", path=config_path, hint="is this a PEFT adapter?")
        plugin.check_json(peft_config, COMMON_SCHEMA, path=config_path, hint="fix adapter_config.json")
        method = method_for_peft_type(peft_type, path)
        tensors, shapes = self._read_tensors(path, method, options)
        base = BaseRef(name=peft_config.get("base_model_name_or_path"), revision=peft_config.get("revision"))
        config = method.from_peft({k: v for k, v in peft_config.items() if k not in BASE_FIELDS}, shapes)
        named = sorted(p.name for p in path.iterdir() if p.is_dir() and (p / CONFIG).is_file())
        provenance: dict[str, Any] = {"source_format": "peft", "source": str(path)}
        if named:
            provenance["named_adapters"] = named
        return Adapter(method=method.name, config=config, tensors=tensors, base=base, provenance=provenance,
                       source=str(path))

    def _read_tensors(self, path: Path, method: AdapterMethod, options: ReadOptions) -> tuple[Any, dict[str, Any]]:
        weights, pickle_path = path / WEIGHTS, path / PICKLE
        if weights.is_file():
            file = SafetensorsFile(weights)
            raw = {key: tuple(file.info(key).shape) for key in file.keys()}
            source: Any = file
        elif pickle_path.is_file():
            state = plugin.load_pickled_tensors(pickle_path, allow_pickle=options.allow_pickle)
            raw = {key: tuple(t.shape) for key, t in state.items()}
            source = state
        else:
            raise InputError(f"adapter_config.json has no {WEIGHTS} beside it", path=path)
        mapping: dict[str, tuple[Any, str]] = {}
        for key in raw:
            module, role = split_peft_key(key, method.peft_roles)
            name = f"{module}.{role}" if module else role
            if name in mapping:
                raise InputError(f"two tensors map to {name}: {mapping[name][1]!r} and {key!r}", path=path)
            mapping[name] = (source, key)
        shapes = {name: raw[key] for name, (_, key) in mapping.items()}
        if isinstance(source, SafetensorsFile):
            return FileStore(mapping), shapes
        return MemoryStore({name: source[key] for name, (_, key) in mapping.items()}, str(pickle_path),
                           keys={name: key for name, (_, key) in mapping.items()}), shapes

    rules = FILE_RULES

    def lint(self, path: Path, adapter: Adapter | None, options: ReadOptions) -> list[plugin.Finding]:
        """Pickled weights (before reading), then an unrecorded or unpinned base (after)."""
        if not path.is_dir():
            return []
        config = path / CONFIG
        if adapter is None:
            if not (path / PICKLE).exists():
                return []
            if (path / WEIGHTS).exists() or options.allow_pickle:
                return [_finding("AT001", f"{PICKLE} is present", path / PICKLE)]
            return [_finding("AT004", f"only {PICKLE} holds the weights", path / PICKLE)]
        if not adapter.base.name:
            return [_finding("AT002", "base_model_name_or_path is null", config, "base_model_name_or_path")]
        name = adapter.base.name
        if not adapter.base.revision and plugin.parse_hub_ref(name) and not Path(name).exists():
            return [_finding("AT003", "revision is null", config, "revision")]
        return []

    def write(self, adapter: Adapter, path: Path, options: WriteOptions = WriteOptions()) -> None:
        method = plugin.get_method(adapter.method)
        if not method.peft_types:
            raise UnsupportedOperationError(f"method {method.name!r} has no PEFT equivalent")
        config = method.to_peft(adapter.config)
        config.setdefault("peft_type", method.peft_types[0])
        config["base_model_name_or_path"] = adapter.base.name
        config["revision"] = adapter.base.revision
        roles_to_suffix = {role: suffix for suffix, role in method.peft_roles.items()}
        factor_modules = {m for m, roles in adapter.modules().items()
                          if any(not r.startswith("replace_") for r in roles)}
        tensors = {}
        for module, roles in adapter.modules().items():
            for role, name in roles.items():
                key = peft_key(module, role, roles_to_suffix, module in factor_modules)
                tensors[key] = adapter.tensor(name).contiguous()
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        plugin.save_tensors(path / WEIGHTS, dict(sorted(tensors.items())),
                               {"format": "pt", "adaptools.tool": f"adaptools {adaptools.__version__}"})
