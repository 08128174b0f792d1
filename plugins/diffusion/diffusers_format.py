"""The diffusers / PEFT image-model LoRA file, as a pipeline's ``save_lora_weights`` writes it
(``pytorch_lora_weights.safetensors``): ``<component>.<module path>.lora_A.weight`` / ``.lora_B.weight`` with
components ``unet``, ``text_encoder``, ``text_encoder_2``, and optionally each component's LoraConfig fields in
the header's ``lora_adapter_metadata`` (``"unet.r"``, ``"unet.lora_alpha"``, ...). Without that metadata
diffusers uses alpha = rank (scale 1). Older attention-processor spellings (``…to_q_lora.down.weight``,
``…lora.down.weight``, ``…lora_linear_layer.down.weight``) are read too. docs/diffusion.md has the grammar.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

import adaptools
from adaptools import plugin
from adaptools.plugin import (
    Adapter,
    AdapterFormatError,
    ReadOptions,
    SafetensorsFile,
    UnsupportedOperationError,
    WriteOptions,
)

from .common import Parsed, build_adapter, family_problems, lora_config, lora_file_keys, module_alphas
from .kohya_facts import FACTS_SCHEMA, kohya_facts
from .lint import RULES, Problem, metadata_info
from .names import COMPONENTS, component_of

METADATA_KEY = "lora_adapter_metadata"
#: adaptools' own header key: what a kohya file said beyond its tensors, so a kohya -> diffusers -> kohya round
#: trip gives the same bytes (diffusers ignores header keys it does not know).
KOHYA_KEY = "adaptools.kohya"
#: LoraConfig fields whose value changes the factors' meaning in a way adaptools' writers do not carry.
UNSUPPORTED_FIELDS = ("use_rslora", "use_dora", "lora_bias")
#: the older attention-processor spellings: (suffix regex, unet replacement, text-encoder replacement)
_OLD = re.compile(r"^(?P<module>.+?)(?:\.processor)?\.(?:(?P<attn>to_q|to_k|to_v|to_out)_lora|lora|lora_linear_layer)"
                  r"\.(?P<part>down|up)\.weight$")
_UNET_ATTN = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TEXT_ATTN = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def _component(key: str) -> str | None:
    head = key.split(".", 1)[0]
    return head if head in COMPONENTS else None


def split_key(key: str) -> tuple[str, str] | None:
    """A diffusers LoRA key -> (module path with component, "down" or "up"), or None."""
    component = _component(key)
    if component is None:
        return None
    if key.endswith((".lora_A.weight", ".lora_B.weight")):
        return key[: -len(".lora_A.weight")], "down" if key.endswith(".lora_A.weight") else "up"
    match = _OLD.match(key)
    if match is None:
        return None
    module = match["module"]
    if match["attn"]:
        names = _UNET_ATTN if component == "unet" else _TEXT_ATTN
        module = f"{module}.{names[match['attn']]}"
    return module, match["part"]


def read_metadata(file: SafetensorsFile, path: Path) -> dict[str, dict[str, Any]]:
    """Per component, the LoraConfig fields the header records (empty when it records none)."""
    raw = file.metadata.get(METADATA_KEY)
    if not raw:
        return {}
    data = plugin.parse_json(raw.encode("utf-8"), path=path, what=METADATA_KEY)
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{METADATA_KEY} is not a JSON object", path=path)
    out: dict[str, dict[str, Any]] = {}
    for key, value in data.items():
        component, _, field = str(key).partition(".")
        if component not in COMPONENTS or not field:
            raise AdapterFormatError(f"{METADATA_KEY} has the field {key!r}, not <component>.<LoraConfig field>",
                                     path=path)
        out.setdefault(component, {})[field] = value
    for component, fields in out.items():
        for flag in UNSUPPORTED_FIELDS:
            if fields.get(flag):
                raise UnsupportedOperationError(f"{METADATA_KEY} sets {component}.{flag}; not supported yet",
                                                path=path, hint="adaptools reads plain diffusers LoRAs")
    return out


class DiffusersFormat(plugin.AdapterFormat):
    name = "diffusers"
    description = "diffusers/PEFT image-model LoRA (.safetensors, unet./text_encoder./text_encoder_2. keys)"
    writes_directory = False

    def detect(self, path: Path) -> bool:
        keys = lora_file_keys(path)
        if keys is None:
            return False
        # any component-prefixed LoRA key claims the file, so that a stray key is named by read()
        return any(_component(k) and ".lora" in k for k in keys)

    def read(self, path: Path, options: ReadOptions) -> Adapter:
        parsed, extra, problems = scan(path)
        return build_adapter(parsed, "diffusers", extra, problems, options.validate)

    rules = RULES

    def lint(self, path: Path, adapter: Adapter | None, options: ReadOptions) -> list[plugin.Finding]:
        """The file's problems (before reading: unknown keys, mixed families, unusable alphas), then whether
        the header records the LoraConfig (after)."""
        if not path.is_file():
            return []
        if adapter is None:
            parsed, _, problems = scan(path)
            return [p.finding(path) for p in problems + family_problems(parsed)[1]]
        return metadata_info(adapter, path)

    def base_mismatch(self, adapter: Adapter, base_config: Mapping[str, Any]) -> str | None:
        from .single_file_layout import family_mismatch  # a single-file base of another family (docs/diffusion.md)

        return family_mismatch(adapter, base_config)

    def write(self, adapter: Adapter, path: Path, options: WriteOptions = WriteOptions()) -> None:
        modules = module_alphas(adapter)
        tensors: dict[str, torch.Tensor] = {}
        per_component: dict[str, tuple[dict[str, int], dict[str, float]]] = {}
        for module, (rank, alpha) in modules.items():
            component, _, inner = module.partition(".")
            if component not in COMPONENTS or not inner:
                raise UnsupportedOperationError(
                    f"module {module} is not in a unet / text_encoder / text_encoder_2 component", path=adapter.source,
                    hint="diffusers keys name the component; this adapter was not made for a diffusers pipeline")
            roles = adapter.modules()[module]
            tensors[f"{module}.lora_A.weight"] = adapter.tensor(roles["lora_A"]).contiguous()
            tensors[f"{module}.lora_B.weight"] = adapter.tensor(roles["lora_B"]).contiguous()
            ranks, alphas = per_component.setdefault(component, ({}, {}))
            ranks[inner], alphas[inner] = rank, alpha
        metadata: dict[str, Any] = {}
        for component, (ranks, alphas) in per_component.items():
            fields = lora_config(ranks, alphas)
            fields.update({"use_dora": False, "lora_bias": False})
            metadata.update({f"{component}.{k}": v for k, v in fields.items()})
        header = {"format": "pt", "adaptools.tool": f"adaptools {adaptools.__version__}",
                  METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)}
        facts = kohya_facts(adapter)
        if facts:
            header[KOHYA_KEY] = json.dumps(facts, sort_keys=True)
        plugin.save_tensors(path, dict(sorted(tensors.items())), header)


def plugin_lora_rank_alpha(fields: dict[str, Any], module: str) -> tuple[int, float]:
    """PEFT's rank and alpha for ``module`` under one component's LoraConfig fields (the lora family's rule)."""
    from ..lora.config import lora_rank_alpha

    return lora_rank_alpha(fields, module, rule="current")


__all__ = ["DiffusersFormat", "component_of", "split_key"]


def scan(path: Path) -> tuple[Parsed, dict[str, Any], list[Problem]]:
    """A diffusers file's modules and alphas, what writing it back needs, and every problem that makes it
    unusable (unknown keys are skipped, each a problem). Refuses outright what cannot be read at all."""
    file = SafetensorsFile(path)
    parsed = Parsed(file=file, path=path)
    problems: list[Problem] = []
    found: dict[str, dict[str, str]] = {}
    for key in file.keys():
        split = split_key(key)
        if split is None:
            problems.append(Problem("DIFF003", "is not a diffusers LoRA key (<unet|text_encoder|text_encoder_2>."
                                               "<module>.lora_A.weight / .lora_B.weight)", key,
                                    "remove the tensor; DoRA magnitudes and LoRA biases are not supported yet"))
            continue
        module, part = split
        slot = found.setdefault(module, {})
        if part in slot:
            raise AdapterFormatError(f"two tensors map to module {module}: {slot[part]!r} and {key!r}",
                                     path=path, tensor=key)
        slot[part] = key
    for module, slot in found.items():
        for part, role in (("down", "lora_A"), ("up", "lora_B")):
            if part not in slot:
                raise AdapterFormatError(f"module has no {role}", path=path, tensor=next(iter(slot.values())),
                                         hint="the file is incomplete; save it again")
        parsed.factors[module] = (slot["down"], slot["up"])
    metadata = read_metadata(file, path)
    for module, (down, _) in parsed.factors.items():
        component, _, inner = module.partition(".")
        fields = metadata.get(component)
        rank = int(file.info(down).shape[0])
        if fields is None:
            parsed.alphas[module] = rank  # diffusers' rule without metadata: scale 1
            continue
        try:
            config_rank, alpha = plugin_lora_rank_alpha(fields, inner)
        except plugin.InputError as exc:
            raise AdapterFormatError(f"{METADATA_KEY}: {exc.message}", path=path) from None
        if config_rank != rank:
            raise AdapterFormatError(f"{METADATA_KEY} gives rank {config_rank} for {module}, the factors have "
                                     f"{rank}", path=path, tensor=down,
                                     hint="the metadata does not belong to these weights")
        if not alpha > 0:
            problems.append(Problem("DIFF001", f"{METADATA_KEY} gives alpha {alpha!r} for {module}; it must be "
                                               "above 0", down))
            parsed.alphas[module] = None
            continue
        parsed.alphas[module] = alpha
    extra: dict[str, Any] = {"metadata": sorted(metadata)}
    if file.metadata.get(KOHYA_KEY):
        facts = plugin.parse_json(file.metadata[KOHYA_KEY].encode("utf-8"), path=path, what=KOHYA_KEY)
        wrong = plugin.json_problems(facts, FACTS_SCHEMA)
        if wrong:
            raise AdapterFormatError(f"{KOHYA_KEY}: {wrong[0][1]}", path=path, hint="remove the header key")
        extra["kohya"] = facts
    return parsed, extra, problems
