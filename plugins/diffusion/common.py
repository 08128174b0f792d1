"""What every image-model LoRA key style shares once its keys are parsed: the factors' checks, the per-module
rank and alpha as a ``lora`` config, and the family and components recorded beside it.

A format plugin parses its key style into :class:`Parsed` (module path -> down and up key, alpha) and hands it
to :func:`build_adapter`; writers read back the same facts with :func:`module_alphas`. The rules are in
docs/diffusion.md ("Alpha", "Module paths", "Model family").
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptools import plugin
from adaptools.plugin import Adapter, AdapterFormatError, BaseRef, FileStore, SafetensorsFile

from ..peft.config_schema import MAX_ALPHA
from .lint import Problem
from .lycoris_keys import full_rank, in_width, method_config, rank_of
from .names import components, detect_family, mixed_family_problem

#: The peft version whose rank/alpha pattern rule the configs built here follow.
PATTERN_RULE_VERSION = "0.15.0"


@dataclass
class Parsed:
    """One file's LoRA modules in schema terms: module path -> (down key, up key), alphas as stored."""

    file: SafetensorsFile
    path: Path
    factors: dict[str, tuple[str, str]] = field(default_factory=dict)
    #: module path -> alpha as the file gives it (None: the file gives none for this module)
    alphas: dict[str, float | None] = field(default_factory=dict)
    #: the key each alpha came from, to name it in errors
    alpha_keys: dict[str, str] = field(default_factory=dict)
    #: the method the file holds: ``lora`` (``factors``), or a LyCORIS one (``loha``, ``lokr``: ``lycoris``)
    method: str = "lora"
    #: LyCORIS modules instead: module path -> {role of the method: key}
    lycoris: dict[str, dict[str, str]] = field(default_factory=dict)
    #: LyCORIS DoRA: module path -> its ``dora_scale`` key (the modules are in ``factors``; dora.py)
    dora: dict[str, str] = field(default_factory=dict)


def lora_file_keys(path: Path) -> dict[str, Any] | None:
    """The tensor entries of a .safetensors file that may be an image-model LoRA (what each format's ``detect``
    looks at), or None: not such a file, unreadable, or an adaptools schema file (the schema format's own)."""
    if not path.is_file() or path.suffix != ".safetensors":
        return None
    try:
        header = plugin.read_header(path)
    except plugin.InputError:
        return None
    if "adaptools.schema" in header.metadata:
        return None
    return header.tensors


def read_alpha(file: SafetensorsFile, key: str, path: Path, problems: list[Problem]) -> float | None:
    """A stored alpha: one number, finite and positive (docs/diffusion.md, "Alpha"); None (and a problem)
    otherwise."""
    info = file.info(key)
    if len(info.shape) > 1 or math.prod(info.shape) != 1:
        problems.append(Problem("DIFF001", f"alpha has shape {list(info.shape)}, expected a single number", key,
                                "the file is damaged or not a kohya LoRA"))
        return None
    value = file.get(key).reshape(()).item()
    number = float(value)
    if not (math.isfinite(number) and 0 < number <= MAX_ALPHA):
        problems.append(Problem("DIFF001", f"alpha is {number!r}; it must be a finite number above 0 and at most "
                                           f"{MAX_ALPHA:g}", key,
                                "set the module's alpha to its rank (scale 1) or to the value it was trained with; "
                                "0 means 'alpha = rank' to kohya's scripts but scale 0 to diffusers, so adaptools "
                                "refuses to guess"))
        return None
    return int(number) if number.is_integer() and not isinstance(value, bool) else number


def check_factors(parsed: Parsed) -> dict[str, int]:
    """Each module's rank, after checking its down and up factors fit each other: down [r, in(, k, k)],
    up [out, r(, 1, 1)]. Returns module -> in-features (for the family)."""
    in_features = {}
    for module, (down, up) in parsed.factors.items():
        d, u = parsed.file.info(down).shape, parsed.file.info(up).shape
        if len(d) not in (2, 4) or len(u) != len(d):
            raise AdapterFormatError(f"down factor {list(d)} and up factor {list(u)} are not a linear or conv "
                                     "LoRA pair", path=parsed.path, tensor=down,
                                     hint="the file is damaged or holds another method")
        if len(u) == 4 and tuple(u[2:]) != (1, 1):
            raise AdapterFormatError(f"up factor {list(u)} has a {u[2]}x{u[3]} kernel; a conv LoRA's up factor is "
                                     "1x1", path=parsed.path, tensor=up,
                                     hint="the file is damaged or holds another method")
        if u[1] != d[0]:
            raise AdapterFormatError(f"down factor has rank {d[0]} but the up factor {list(u)} expects "
                                     f"{u[1]}", path=parsed.path, tensor=up,
                                     hint="the down and up tensors of this module do not belong together")
        if d[0] < 1:
            raise AdapterFormatError("rank 0", path=parsed.path, tensor=down, hint="drop this module")
        in_features[module] = int(d[1])
    return in_features


def lora_config(ranks: dict[str, int], alphas: dict[str, float]) -> dict[str, Any]:
    """The PEFT-style config that gives each module its rank and alpha: the most common as ``r`` /
    ``lora_alpha``, the others in ``rank_pattern`` and ``alpha_pattern`` under keys that select exactly that
    module in every peft version (the lora family's ``portable_pattern_keys``), so every peft reads the same
    rank and alpha."""
    from ..lora.legacy import portable_pattern_keys

    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    alpha = Counter(alphas.values()).most_common(1)[0][0] if alphas else r
    keys = portable_pattern_keys(sorted(ranks))
    # a module that differs in either goes into both patterns: peft 0.6 to 0.13 took one key for both
    odd = [m for m in sorted(ranks) if ranks[m] != r or alphas[m] != alpha]
    return {"r": r, "lora_alpha": alpha,
            "rank_pattern": {keys[m]: ranks[m] for m in odd},
            "alpha_pattern": {keys[m]: alphas[m] for m in odd},
            "target_modules": sorted(ranks)}


def family_problems(parsed: Parsed) -> tuple[dict[str, int], list[Problem]]:
    """Each module's in-features (the factors checked), and DIFF002 if they cannot come from one model."""
    in_features = check_factors(parsed)
    for module, roles in parsed.lycoris.items():
        in_features[module] = in_width(parsed.method, parsed.file, roles)
    problem = mixed_family_problem(in_features)
    return in_features, ([Problem("DIFF002", problem)] if problem else [])


def build_adapter(parsed: Parsed, key_style: str, extra: dict[str, Any], problems: list[Problem],
                  validate: bool) -> Adapter:
    """The schema adapter of a parsed file: method ``lora`` (or ``loha`` for LyCORIS LoHa keys); config with
    per-module rank and alpha (a missing alpha is the rank), ``model_family``, ``components`` and
    ``diffusion`` (what writing the key style back needs). With ``validate`` the first problem is raised;
    without (``check``), the adapter is built from what is usable and an unusable alpha reads as the rank, so
    that the problem is reported once, by its rule."""
    if not parsed.factors and not parsed.lycoris:
        raise AdapterFormatError("holds no LoRA modules", path=parsed.path,
                                 hint="is this an image-model LoRA (kohya or diffusers keys)?")
    in_features, mixed = family_problems(parsed)
    problems = problems + mixed
    if validate and problems:
        raise problems[0].error(parsed.path)
    mapping = {}
    full_rank_modules: dict[str, int] = {}
    if parsed.lycoris:  # LyCORIS: PEFT's roles of the method and LycorisConfig fields (r, alpha, patterns)
        name = parsed.method
        ranks = {}
        for module, roles in parsed.lycoris.items():
            rank = rank_of(name, parsed.file, roles)
            if rank is None:  # LoKr with both factors full: scale 1 whatever the alpha (lycoris_keys.py)
                rank = full_rank_modules[module] = full_rank(parsed.file, roles)
            ranks[module] = rank
            mapping.update({f"{module}.{role}": (parsed.file, key) for role, key in roles.items()})
    else:
        name = "lycoris_dora" if parsed.dora else "lora"
        ranks = {m: int(parsed.file.info(down).shape[0]) for m, (down, _) in parsed.factors.items()}
        for module, (down, up) in parsed.factors.items():
            mapping[f"{module}.lora_A"] = (parsed.file, down)
            mapping[f"{module}.lora_B"] = (parsed.file, up)
            if module in parsed.dora:
                mapping[f"{module}.dora_scale"] = (parsed.file, parsed.dora[module])
    alphas = {m: (ranks[m] if parsed.alphas.get(m) is None or m in full_rank_modules else parsed.alphas[m])
              for m in ranks}
    config = lora_config(ranks, alphas)  # type: ignore[arg-type]
    if name not in ("lora", "lycoris_dora"):
        config["alpha"] = config.pop("lora_alpha")
        config.update(method_config(name, parsed.file, parsed.lycoris))
    # The pattern keys are written for today's peft rule; with two text encoders some can only be anchored
    # full paths, which peft before 0.15 does not match. Saying which rule they follow keeps check (LORA021)
    # from reporting old peft versions that never read these files (docs/diffusion.md, "Alpha").
    config["peft_version"] = PATTERN_RULE_VERSION
    family, why = detect_family(in_features)
    shapes = {n: tuple(file.info(key).shape) for n, (file, key) in mapping.items()}
    full = plugin.get_method(name).from_peft(config, shapes)
    full["model_family"] = family
    full["components"] = components(ranks)
    full["diffusion"] = {"key_style": key_style, "family_evidence": why, **extra}
    return Adapter(method=name, config=full, tensors=FileStore(mapping), base=BaseRef(),
                   provenance={"source_format": key_style, "source": str(parsed.path)}, source=str(parsed.path))


def module_alphas(adapter: Adapter) -> dict[str, tuple[int, float]]:
    """module -> (rank, alpha) of a LoRA adapter, refusing what an image-model key style cannot hold."""
    if adapter.method == "lycoris_dora":  # dora.py
        raise plugin.UnsupportedOperationError(
            "LyCORIS DoRA (dora_scale) has no diffusers/PEFT form: diffusers' SD 1.x/SDXL loaders drop dora_scale, "
            "and PEFT's DoRA (lora_magnitude_vector) normalises without LyCORIS' epsilon and only per output row",
            path=adapter.source, hint="write it with --to kohya")
    if adapter.method != "lora":
        raise plugin.UnsupportedOperationError(
            f"image-model key styles hold LoRA adapters (and the kohya style LoHa), not {adapter.method}",
            path=adapter.source, hint="write LoHa adapters with --to kohya" if adapter.method == "loha" else None)
    config = adapter.config
    for flag in ("use_rslora", "use_dora", "lora_bias", "fan_in_fan_out"):
        if config.get(flag):
            raise plugin.UnsupportedOperationError(f"{flag} is set; the kohya and diffusers writers of adaptools "
                                                   "hold plain LoRA only", path=adapter.source)
    out = {}
    for module, roles in adapter.modules().items():
        if set(roles) != {"lora_A", "lora_B"}:
            extra = sorted(set(roles) - {"lora_A", "lora_B"})
            raise plugin.UnsupportedOperationError(
                f"module {module} has {', '.join(extra) or 'no lora_A/lora_B'}; only plain LoRA factors are "
                "written in image-model key styles", path=adapter.source)
        info = config.get("modules", {}).get(module, {})
        if info.get("alpha") is None:
            raise AdapterFormatError(f"module {module} has no alpha in the config", path=adapter.source)
        out[module] = (int(info["rank"]), info["alpha"])
    return out
