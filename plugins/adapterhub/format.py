"""The AdapterHub (``adapters`` library) directory format, as ``model.save_adapter(dir, name)`` writes it.

``adapter_config.json`` (``{"config": {...flags...}, "hidden_size", "model_class", "model_name",
"model_type", "name", "version"}``) beside ``adapter.safetensors`` (``use_safetensors=True``) or the
default pickle ``pytorch_adapter.bin`` (read only with --allow-pickle, and then with
``torch.load(weights_only=True)``). Keys are ``<layer>.<attention|output|cross_attention>_adapters.
adapters.<name>.<param>``. A ``head_config.json`` / ``model_head.*`` pair beside them is the model's
prediction head, not part of the adapter: it is ignored and named in the provenance.

Only bottleneck configurations are read (the ``bottleneck`` method); AdapterHub's LoRA, prefix tuning and
union configs are refused with the reason. Writing produces ``adapter.safetensors``, which the library
loads with ``load_adapter``.
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
    BaseRef,
    FileStore,
    InputError,
    MemoryStore,
    ReadOptions,
    SafetensorsFile,
    UnsupportedOperationError,
    WriteOptions,
)

CONFIG = "adapter_config.json"
WEIGHTS = "adapter.safetensors"
PICKLE = "pytorch_adapter.bin"
HEAD_FILES = ("head_config.json", "model_head.safetensors", "pytorch_model_head.bin")
CONTAINERS = {"attention_adapters": "mh_adapter", "output_adapters": "output_adapter",
              "cross_attention_adapters": "cross_adapter"}
LOCATION_TO_CONTAINER = {v: k for k, v in CONTAINERS.items()}
_TEXT = {"type": ["string", "null"], "maxLength": 4096}
#: The file's own fields; the architecture flags in "config" are the bottleneck method's to check.
FILE_SCHEMA = {"type": "object", "properties": {
    "model_name": _TEXT, "model_type": _TEXT, "model_class": _TEXT, "version": _TEXT,
    "name": {"type": ["string", "null"], "maxLength": 200, "pattern": "^[^.]*$",
             "description": "an adapter name without dots"},
    "hidden_size": {"type": ["integer", "null"], "minimum": 1, "maximum": 2**31, "description": "a positive integer"},
    "config": {"type": "object", "properties": {"architecture": _TEXT}}}}
KEY = re.compile(r"^(?P<layer>.+)\.(?P<container>" + "|".join(CONTAINERS) + r")\.adapters\.(?P<name>[^.]+)\."
                 r"(?P<param>.+)$")


def module_names(ln_before: bool) -> dict[str, str]:
    """Role (without ``_bias``) -> the library's submodule name. With ``ln_before`` the library puts its
    LayerNorm first in ``adapter_down``, so the linear layer is ``adapter_down.1``."""
    return {"down": f"adapter_down.{1 if ln_before else 0}", "up": "adapter_up",
            "norm_before": "adapter_norm_before", "norm_after": "adapter_norm_after", "gate": "gate"}


def param_to_role(param: str, ln_before: bool) -> str | None:
    """An AdapterHub parameter name -> canonical role; None for the duplicate of ``adapter_norm_before``.

    Raises KeyError for a parameter that is not part of a plain bottleneck (PHM layers, for example).
    """
    if param == "scaling":
        return "scaling"
    kind, _, leaf = param.rpartition(".")
    if kind == "adapter_down.0" and ln_before:
        return None  # the same LayerNorm as adapter_norm_before, registered twice by the library
    roles = {name: role for role, name in module_names(ln_before).items()}
    if kind not in roles or leaf not in ("weight", "bias"):
        raise KeyError(param)
    return roles[kind] + ("_bias" if leaf == "bias" else "")


def role_to_params(role: str, ln_before: bool) -> list[str]:
    """The inverse of :func:`param_to_role` (the norm before is written under both of its names)."""
    if role == "scaling":
        return ["scaling"]
    base, leaf = (role[: -len("_bias")], "bias") if role.endswith("_bias") else (role, "weight")
    names = [f"{module_names(ln_before)[base]}.{leaf}"]
    if base == "norm_before":
        names.append(f"adapter_down.0.{leaf}")
    return names


class AdapterHubFormat(plugin.AdapterFormat):
    name = "adapterhub"
    description = "AdapterHub `adapters` directory (adapter_config.json + adapter.safetensors)"

    def detect(self, path: Path) -> bool:
        if path.is_file() and path.name in (CONFIG, WEIGHTS, PICKLE):
            path = path.parent
        return path.is_dir() and (path / CONFIG).is_file() and ((path / WEIGHTS).is_file()
                                                                 or (path / PICKLE).is_file())

    def read(self, path: Path, options: ReadOptions) -> Adapter:
        if path.is_file():
            path = path.parent
        config_path = path / CONFIG
        config = plugin.read_json(config_path, what=CONFIG, max_bytes=4 * 1024 * 1024)
        inner = config.get("config") if isinstance(config, dict) else None
        if not isinstance(inner, dict):
            raise InputError("has no \"config\" object", path=config_path,
                             hint="is this an AdapterHub adapter saved with save_adapter?")
        plugin.check_json(config, FILE_SCHEMA, path=config_path, hint="fix adapter_config.json")
        architecture = inner.get("architecture") or "bottleneck"
        if architecture != "bottleneck":
            raise UnsupportedOperationError(
                f"AdapterHub {architecture!r} adapters are not supported (adaptools reads AdapterHub bottleneck "
                "adapters)", path=config_path,
                hint="for LoRA and prefix tuning, export with PEFT instead" if architecture != "union" else None)
        ln_before = bool(inner.get("ln_before"))
        source, raw = self._read_raw(path, options)
        mapping: dict[str, tuple[Any, str]] = {}
        for key in raw:
            match = KEY.match(key)
            if match is None:
                raise InputError(f"tensor {key!r} is not a bottleneck adapter parameter", path=path,
                                 hint="invertible adapters and fusion layers are not supported")
            try:
                role = param_to_role(match["param"], ln_before)
            except KeyError:
                raise InputError(f"tensor {key!r}: unknown parameter {match['param']!r}", path=path,
                                 hint="PHM (Compacter) layers are not supported") from None
            if role is None:
                continue
            mapping[f"{match['layer']}.{CONTAINERS[match['container']]}.{role}"] = (source, key)
        if isinstance(source, SafetensorsFile):
            tensors: Any = FileStore(mapping)
        else:
            tensors = MemoryStore({n: source[k] for n, (_, k) in mapping.items()}, str(path / PICKLE),
                                  keys={n: k for n, (_, k) in mapping.items()})
        provenance: dict[str, Any] = {"source_format": "adapterhub", "source": str(path)}
        ignored = [name for name in HEAD_FILES if (path / name).is_file()]
        if ignored:
            provenance["ignored_head_files"] = ignored
        return Adapter(method="bottleneck", config={k: v for k, v in config.items() if k != "model_name"},
                       tensors=tensors, base=BaseRef(name=config.get("model_name")), provenance=provenance,
                       source=str(path))

    def _read_raw(self, path: Path, options: ReadOptions) -> tuple[Any, list[str]]:
        if (path / WEIGHTS).is_file():
            file = SafetensorsFile(path / WEIGHTS)
            return file, list(file.keys())
        state = plugin.load_pickled_tensors(path / PICKLE, allow_pickle=options.allow_pickle, instead=WEIGHTS)
        return state, list(state)

    def write(self, adapter: Adapter, path: Path, options: WriteOptions = WriteOptions()) -> None:
        if adapter.method != "bottleneck":
            raise UnsupportedOperationError(f"the AdapterHub format holds bottleneck adapters, not {adapter.method}")
        config = dict(adapter.config)
        config["model_name"] = adapter.base.name
        name = config.get("name") or "adapter"
        ln_before = bool((config.get("config") or {}).get("ln_before"))
        tensors = {}
        for module, roles in adapter.modules().items():
            layer, _, location = module.rpartition(".")
            for role, tensor_name in roles.items():
                for param in role_to_params(role, ln_before):
                    key = f"{layer}.{LOCATION_TO_CONTAINER[location]}.adapters.{name}.{param}"
                    tensors[key] = adapter.tensor(tensor_name).contiguous().clone()
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        plugin.save_tensors(path / WEIGHTS, dict(sorted(tensors.items())),
                               {"format": "pt", "adaptools.tool": f"adaptools {adaptools.__version__}"})
