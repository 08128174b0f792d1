"""The kohya / sd-scripts LoRA file (what A1111, ComfyUI and most published SD LoRAs use): one ``.safetensors``
with ``<prefix><flattened module>.lora_down.weight`` / ``.lora_up.weight`` and a scalar ``.alpha`` per module;
prefixes ``lora_unet_``, ``lora_te_`` (SD 1.x) or ``lora_te1_`` / ``lora_te2_`` (SDXL). The key grammar and the
alpha rule (scale = alpha / rank per module; no alpha means alpha = rank) are in docs/diffusion.md. LyCORIS
LoHa and LoKr files (``.hada_w1_a``..., ``.lokr_w1``... under the same names) read into the ``loha`` and
``lokr`` methods (lycoris_keys.py; docs/diffusion.md, "LoHa" and "LoKr").
"""

from __future__ import annotations

from collections import Counter
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

from . import flux_read, sgm_kohya
from .common import Parsed, build_adapter, family_problems, lora_file_keys, module_alphas, read_alpha
from .dora import NAME as DORA
from .dora import lora_view
from .kohya_facts import alpha_tensor, kohya_facts
from .ldm_names import Layout
from .lint import RULES, Problem, alpha_warnings
from .lycoris_keys import NAMES, full_rank, incomplete, rank_of
from .lycoris_keys import ROLES as LYCORIS_ROLES
from .names import component_of, split_flat

#: kohya prefix -> pipeline component
PREFIXES = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2",
            "lora_te_": "text_encoder"}
FACTOR_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha",
                   ".dora_scale": "dora_scale"}
#: LyCORIS LoHa's and LoKr's tensors under the same prefixes: the role names of the ``loha`` and ``lokr``
#: methods (docs/diffusion.md, "LoHa", "LoKr")
FACTOR_SUFFIXES.update({f".{role}": role for roles in LYCORIS_ROLES.values() for role in roles})
#: other methods' suffixes under the same prefixes (docs/diffusion.md, "What is refused")
OTHER_METHODS = {"diff": "a full weight difference (LyCORIS)", "oft_": "OFT (LyCORIS)"}

def _prefix(key: str) -> str | None:
    return next((p for p in PREFIXES if key.startswith(p)), None)


class KohyaFormat(plugin.AdapterFormat):
    name = "kohya"
    description = "kohya/sd-scripts image-model LoRA (.safetensors, lora_unet_/lora_te*_ keys with alpha)"
    writes_directory = False

    def detect(self, path: Path) -> bool:
        keys = lora_file_keys(path)
        if keys is None:
            return False
        # any kohya-prefixed key claims the file, so that a stray key is named by read() (not "unrecognised");
        # OneTrainer's lora_transformer_ (Flux) too
        return any(_prefix(k) or k.startswith("lora_transformer_") for k in keys)

    def read(self, path: Path, options: ReadOptions) -> Adapter:
        if is_flux_file(path):  # BFL layer names under lora_unet_ (docs/diffusion.md, "Flux")
            flux, flux_problems = flux_read.scan(path)
            return flux_read.build(flux, flux_problems, options.validate)
        parsed, facts, problems = scan(path)
        return build_adapter(parsed, "kohya", {"kohya": facts}, problems, options.validate)

    rules = RULES

    def lint(self, path: Path, adapter: Adapter | None, options: ReadOptions) -> list[plugin.Finding]:
        """The file's problems (before reading: unknown keys, mixed prefixes or families, unusable alphas),
        then where diffusers would scale it differently (after)."""
        if not path.is_file():
            return []
        if adapter is None:
            if is_flux_file(path):
                return [p.finding(path) for p in flux_read.scan(path)[1]]
            parsed, _, problems = scan(path)
            return [p.finding(path) for p in problems + family_problems(parsed)[1]]
        return alpha_warnings(adapter, path)

    def base_mismatch(self, adapter: Adapter, base_config: Mapping[str, Any]) -> str | None:
        from .single_file_layout import family_mismatch  # a single-file base of another family (docs/diffusion.md)

        return family_mismatch(adapter, base_config)

    def write(self, adapter: Adapter, path: Path, options: WriteOptions = WriteOptions()) -> None:
        from .flux_write import is_flux_adapter, write

        if is_flux_adapter(adapter):
            write(adapter, path, "kohya")
            return
        if adapter.method in LYCORIS_ROLES:
            modules = lycoris_alphas(adapter)
        else:  # LyCORIS DoRA: the factors and alphas as plain LoRA, and each dora_scale beside them
            modules = module_alphas(lora_view(adapter) if adapter.method == DORA else adapter)
        config = adapter.config
        facts = kohya_facts(adapter)
        absent = set(facts.get("alpha_absent") or [])
        ignored = {m: (tuple(v[0]), v[1]) for m, v in (facts.get("lokr_ignored_alpha") or {}).items()}
        dtypes = facts.get("alpha_dtypes") or {}
        default_dtype = facts.get("alpha_dtype")
        te = facts.get("te_prefix")
        if te not in ("lora_te", "lora_te1"):
            sdxl = "text_encoder_2" in {component_of(m) for m in modules} or config.get("model_family") == "sdxl"
            te = "lora_te1" if sdxl else "lora_te"
        prefix = {"unet": "lora_unet", "text_encoder": te, "text_encoder_2": "lora_te2"}
        tensors: dict[str, torch.Tensor] = {}
        for module, (rank, alpha) in modules.items():
            component, _, inner = module.partition(".")
            if component not in prefix or not inner:
                raise UnsupportedOperationError(
                    f"module {module} is not in a unet / text_encoder / text_encoder_2 component", path=adapter.source,
                    hint="kohya keys name the component; this adapter was not made for a diffusers pipeline")
            name = f"{prefix[component]}_{inner.replace('.', '_')}"
            roles = adapter.modules()[module]
            if adapter.method in LYCORIS_ROLES:  # LyCORIS keys are the method's roles themselves
                tensors.update({f"{name}.{role}": adapter.tensor(t).contiguous() for role, t in roles.items()})
            else:
                tensors[f"{name}.lora_down.weight"] = adapter.tensor(roles["lora_A"]).contiguous()
                tensors[f"{name}.lora_up.weight"] = adapter.tensor(roles["lora_B"]).contiguous()
                if "dora_scale" in roles:
                    tensors[f"{name}.dora_scale"] = adapter.tensor(roles["dora_scale"]).contiguous()
            if module in absent and alpha == rank:
                continue
            if module in ignored and (rank, alpha) == ignored[module][0]:  # LoKr, both factors full: as read
                alpha = ignored[module][1]
            tensors[f"{name}.alpha"] = alpha_tensor(alpha, dtypes.get(module) or default_dtype, module, adapter)
        plugin.save_tensors(path, dict(sorted(tensors.items())),
                            {"format": "pt", "adaptools.tool": f"adaptools {adaptools.__version__}"})


def lycoris_alphas(adapter: Adapter) -> dict[str, tuple[int, float]]:
    """module -> (rank, alpha) of a LoHa or LoKr adapter (PEFT's LycorisConfig rule), refusing roles LyCORIS'
    kohya files do not hold."""
    from ..lycoris.base import lycoris_rank_alpha

    out = {}
    for module, roles in adapter.modules().items():
        extra = sorted(set(roles) - set(LYCORIS_ROLES[adapter.method]))
        if extra:
            raise UnsupportedOperationError(f"module {module} has {', '.join(extra)}, which kohya "
                                            f"{NAMES[adapter.method]} files do not hold", path=adapter.source)
        out[module] = lycoris_rank_alpha(adapter.config, module)
    return out


def is_flux_file(path: Path) -> bool:
    """Whether a kohya-prefixed file names FLUX.1 layers (BFL names under ``lora_unet_``, or OneTrainer's
    ``lora_transformer_``), so the Flux reader takes it."""
    return any(flux_read.is_flux_key(k) for k in plugin.read_header(path).tensors)


def _sgm_layout(keys: list[str]) -> Layout | None:
    """The UNet layout of a file naming the UNet's blocks in the original SGM names (and no block in
    diffusers' names), or None (docs/diffusion.md, "SGM block names")."""
    flats = [k.partition(".")[0][len("lora_unet_"):] for k in keys if k.startswith("lora_unet_")]
    if not any(sgm_kohya.is_sgm(f) for f in flats) or \
            any(f.startswith(("down_blocks_", "mid_block_", "up_blocks_")) for f in flats):
        return None
    return sgm_kohya.layout_of(sgm_kohya.original_path(f) for f in flats if sgm_kohya.is_original(f))


def scan(path: Path) -> tuple[Parsed, dict[str, Any], list[Problem]]:
    """A kohya file's modules, what writing it back needs, and every problem that makes it unusable (unknown
    keys are skipped, each a problem). Refuses outright what cannot be read at all (a factor without its
    partner, two keys for one factor)."""
    file = SafetensorsFile(path)
    parsed = Parsed(file=file, path=path)
    problems: list[Problem] = []
    found: dict[str, dict[str, str]] = {}
    prefixes: Counter[str] = Counter()
    sgm = _sgm_layout(list(file.keys()))
    for key in file.keys():
        prefix = _prefix(key)
        if prefix is None:
            problems.append(Problem("DIFF003", "is not a kohya LoRA key (expected lora_unet_, lora_te_, lora_te1_ "
                                               "or lora_te2_)", key))
            continue
        name, dot, suffix = key.partition(".")
        part = FACTOR_SUFFIXES.get(dot + suffix)
        if part is None:
            method = next((m for s, m in OTHER_METHODS.items() if suffix.startswith(s)), None)
            problems.append(Problem("DIFF003", f"{method} keys are not supported yet" if method else
                                    f"unknown kohya tensor suffix .{suffix}", key,
                                    "adaptools reads plain kohya LoRA (lora_down, lora_up, alpha)", unsupported=True))
            continue
        flat = name[len(prefix):]
        if prefix == "lora_unet_" and sgm is not None and sgm_kohya.is_original(flat):
            inner = sgm_kohya.to_diffusers(sgm_kohya.original_path(flat), sgm)
            if inner is None:
                problems.append(Problem("DIFF003", "names no module of the original (SGM) UNet", key))
                continue
        elif prefix == "lora_unet_" and sgm_kohya.is_sgm(flat):  # beside diffusers' block names
            problems.append(Problem("DIFF003", "original SGM block names beside diffusers' block names", key,
                                    "a file names the UNet's blocks one way"))
            continue
        else:
            inner = split_flat(flat)
        prefixes[prefix] += 1
        module = f"{PREFIXES[prefix]}.{inner}"
        slot = found.setdefault(module, {})
        if part in slot:
            raise AdapterFormatError(f"two tensors map to module {module}: {slot[part]!r} and {key!r}",
                                     path=path, tensor=key)
        slot[part] = key
    if "lora_te_" in prefixes and ({"lora_te1_", "lora_te2_"} & set(prefixes)):
        problems.append(Problem("DIFF002", "mixes lora_te_ (SD 1.x) with lora_te1_/lora_te2_ (SDXL) text-encoder "
                                           "keys"))
    by_method = {"lora": {m for m, slot in found.items() if "down" in slot or "up" in slot}}
    by_method.update({name: {m for m, slot in found.items() if any(r in slot for r in roles)}
                      for name, roles in LYCORIS_ROLES.items()})
    present = [name for name, modules in by_method.items() if modules]
    if len(present) > 1:
        first, second = present[:2]
        problems.append(Problem("DIFF003", f"mixes {NAMES[first]} modules ({sorted(by_method[first])[0]}) with "
                                           f"{NAMES[second]} modules ({sorted(by_method[second])[0]}); a file holds "
                                           "one method", None, "split the file per method"))
    # one method is read: LoRA if any, else the first LyCORIS one; modules of another method are dropped (the
    # problem above says so, and refuses the file unless it is only being checked)
    parsed.method = present[0] if present else "lora"
    for name in present[1:]:
        for module in by_method[name] - by_method[parsed.method]:
            found.pop(module, None)
    if parsed.method != "lora":
        for module in sorted(by_method[parsed.method]):
            slot = found.pop(module)
            roles = {r: k for r, k in slot.items() if r != "alpha"}
            if "dora_scale" in roles:  # LyCORIS' DoHa / DoKr: not read yet (docs/diffusion.md, "DoRA")
                problems.append(Problem("DIFF003", f"DoRA on {NAMES[parsed.method]} modules is not supported yet",
                                        roles.pop("dora_scale"), "adaptools reads DoRA on LoRA modules",
                                        unsupported=True))
            error = incomplete(parsed.method, module, roles, path)
            if error is not None:
                raise error
            parsed.lycoris[module] = roles
            if "alpha" in slot:
                parsed.alphas[module] = read_alpha(file, slot["alpha"], path, problems)
                parsed.alpha_keys[module] = slot["alpha"]
    else:
        for module in by_method["lora"]:
            if any(r in found[module] for roles in LYCORIS_ROLES.values() for r in roles):
                found.pop(module)
    for module, slot in found.items():
        for part in ("down", "up"):
            if part not in slot:
                other = slot.get("down") or slot.get("up") or slot.get("dora_scale") or slot["alpha"]
                raise AdapterFormatError(f"module has no lora_{part}.weight", path=path, tensor=other,
                                         hint="the file is incomplete; save it again")
        parsed.factors[module] = (slot["down"], slot["up"])
        if "dora_scale" in slot:  # LyCORIS DoRA (dora.py)
            parsed.dora[module] = slot["dora_scale"]
        if "alpha" in slot:
            parsed.alphas[module] = read_alpha(file, slot["alpha"], path, problems)
            parsed.alpha_keys[module] = slot["alpha"]
    dtypes = {m: file.info(k).dtype for m, k in parsed.alpha_keys.items()}
    common = Counter(dtypes.values()).most_common(1)[0][0] if dtypes else None
    te_prefix = next((p.rstrip("_") for p in ("lora_te_", "lora_te1_") if p in prefixes), None)
    facts: dict[str, Any] = {"alpha_dtype": common,
                             "alpha_dtypes": {m: d for m, d in sorted(dtypes.items()) if d != common},
                             "alpha_absent": sorted(m for m in [*parsed.factors, *parsed.lycoris]
                                                    if m not in parsed.alphas)}
    if parsed.method == "lokr":  # both factors full: LyCORIS ignores the alpha (lycoris_keys.py)
        ignored = {m: [[full_rank(file, roles)] * 2, parsed.alphas[m]] for m, roles in parsed.lycoris.items()
                   if rank_of("lokr", file, roles) is None and parsed.alphas.get(m) is not None}
        if ignored:
            facts["lokr_ignored_alpha"] = ignored
    if te_prefix:
        facts["te_prefix"] = te_prefix
    return parsed, facts, problems
