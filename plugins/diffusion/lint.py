"""``adaptools check`` rules of image-model LoRA files (docs/ci.md, docs/diffusion.md "Checks").

Readers collect a :class:`Problem` for each thing that makes a file unusable; ``load`` refuses on the first
(one line, exit 2), ``check`` reports every one as a finding. The warnings are where kohya's rules and
diffusers' loader give the same file different scales.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptools import plugin
from adaptools.plugin import Adapter, AdapterFormatError, UnsupportedOperationError

from .names import component_of

RULES = {
    "DIFF001": ("error", "alpha is not a finite number in (0, 1e6] (NaN, infinity, 0, negative, huge)"),
    "DIFF002": ("error", "keys of two model families or of both text-encoder prefix styles are mixed, or "
                         "text-encoder modules for another encoder"),
    "DIFF003": ("error", "a key maps to no LoRA module (unknown key, another method, SGM block names beside "
                         "diffusers' names)"),
    "DIFF004": ("warning", "some modules have an alpha and others none: diffusers scales the others differently"),
    "DIFF005": ("warning", "an attention projection's alpha is not its component's most common alpha: diffusers "
                           "loads it with the common one"),
    "DIFF006": ("info", "no lora_adapter_metadata: every module is read with alpha = rank (scale 1)"),
    "DIFF007": ("warning", "a Flux final-layer alpha is not its rank: diffusers' kohya loader drops it (scale 1)"),
}
FIXES = {
    "DIFF001": "set the module's alpha to the value it was trained with (its rank means scale 1)",
    "DIFF002": "split the file per model, or rename one set of keys",
    "DIFF003": "remove the key, or read the file with the tool that wrote it",
    "DIFF004": "give every module an alpha (its rank keeps scale 1)",
    "DIFF005": "convert to the diffusers key style (adaptools convert --to diffusers), which diffusers reads exactly",
    "DIFF006": "record the LoraConfig (save_lora_weights(..., unet_lora_adapter_metadata=...)) if alpha != rank",
    "DIFF007": "convert to the diffusers key style (adaptools convert --to diffusers), which diffusers reads exactly",
}
#: the Flux modules of BFL's final layer, whose alphas diffusers' kohya loader drops (docs/diffusion.md, "Flux")
FLUX_FINAL = ("transformer.norm_out.linear", "transformer.proj_out")
#: Attention projections diffusers' kohya loader renames to the attention-processor style.
ATTENTION_SUFFIXES = (".to_q", ".to_k", ".to_v", ".to_out.0", ".q_proj", ".k_proj", ".v_proj", ".out_proj")


@dataclass
class Problem:
    rule: str
    message: str
    tensor: str | None = None
    hint: str | None = None
    unsupported: bool = False

    def error(self, path: Path) -> plugin.AdaptoolsError:
        cls = UnsupportedOperationError if self.unsupported else AdapterFormatError
        return cls(self.message, path=path, tensor=self.tensor, hint=self.hint or FIXES[self.rule])

    def finding(self, path: Path) -> plugin.Finding:
        return plugin.Finding(self.rule, RULES[self.rule][0], self.message, self.hint or FIXES[self.rule],
                              str(path), self.tensor)


def _finding(rule: str, message: str, path: Path, tensor: str | None = None) -> plugin.Finding:
    return plugin.Finding(rule, RULES[rule][0], message, FIXES[rule], str(path), tensor)


def alpha_warnings(adapter: Adapter, path: Path) -> list[plugin.Finding]:
    """DIFF004 and DIFF005 for a file read from kohya keys: where diffusers' loader departs from kohya's rule;
    DIFF007 for a Flux file in BFL's layer names."""
    diffusion = adapter.config.get("diffusion") or {}
    modules = adapter.config.get("modules") or {}
    if adapter.config.get("model_family") == "flux":  # diffusers keeps each Flux layer's alpha, but these two
        if diffusion.get("key_style") not in ("kohya", "bfl"):  # OneTrainer files keep it in diffusers
            return []
        odd = [m for m in FLUX_FINAL if m in modules and modules[m]["alpha"] != modules[m]["rank"]]
        return [_finding("DIFF007", f"{odd[0]} has alpha {modules[odd[0]]['alpha']!r} at rank "
                                    f"{modules[odd[0]]['rank']}; diffusers loads it with scale 1", path)] if odd else []
    if diffusion.get("key_style") != "kohya":
        return []
    absent = set((diffusion.get("kohya") or {}).get("alpha_absent") or [])
    out = []
    if absent and len(absent) < len(modules):
        first = sorted(absent)[0]
        out.append(_finding("DIFF004", f"{len(absent)} module(s) have no alpha (first: {first}); kohya reads them as "
                                       "alpha = rank, diffusers as the most common alpha of their component", path))
    for component in sorted({component_of(m) for m in modules}):
        alphas = {m: v["alpha"] for m, v in modules.items() if component_of(m) == component and m not in absent}
        if not alphas:
            continue
        common = Counter(alphas.values()).most_common(1)[0][0]
        odd = sorted(m for m, a in alphas.items() if a != common and m.endswith(ATTENTION_SUFFIXES))
        if odd:
            out.append(_finding("DIFF005", f"{len(odd)} attention projection(s) of {component} have an alpha other "
                                           f"than {common!r} (first: {odd[0]}, alpha {alphas[odd[0]]!r}); diffusers "
                                           f"loads them with {common!r}", path))
    return out


def metadata_info(adapter: Adapter, path: Path) -> list[plugin.Finding]:
    """DIFF006 for a diffusers-style file whose header records no LoraConfig."""
    diffusion: dict[str, Any] = adapter.config.get("diffusion") or {}
    if diffusion.get("key_style") != "diffusers" or diffusion.get("metadata"):
        return []
    return [_finding("DIFF006", "the header has no lora_adapter_metadata", path)]
