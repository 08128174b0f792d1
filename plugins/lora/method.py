"""LoRA, every PEFT variant: the tensors, the config rules and the exact merge math.

Written as a third-party plugin would be: it imports only the public ``adaptools`` API. The method lives
here (config translation, merge maths, algebra, OLoRA/PiSSA); ``config.py`` holds what the PEFT config
means, ``lint.py`` the check rules and ``runtime.py`` the unmerged application.

Canonical roles (tensor name ``<module>.<role>``):

==================  ====================================  ==========================================
role                shape                                 PEFT key suffix
==================  ====================================  ==========================================
lora_A              [r, in] (conv: [r, in, k...])         ``lora_A.weight``
lora_B              [out, r] (conv: [out, r, 1...])       ``lora_B.weight``
lora_bias           [out]                                 ``lora_B.bias`` (``lora_bias=true``)
lora_embedding_A    [r, num_embeddings]                   ``lora_embedding_A``
lora_embedding_B    [embedding_dim, r]                    ``lora_embedding_B``
lora_magnitude      [out] / [1,out,1,1] / [dim]           ``lora_magnitude_vector`` (DoRA)
trainable_tokens    [len(indices), dim]                   ``token_adapter.trainable_tokens_delta``
replace_<param>     the base parameter's (maybe resized)  ``<param>`` / ``base_layer.<param>``
==================  ====================================  ==========================================

The config is PEFT's LoRA config (same field names, same meaning) plus ``modules``: per module its
``kind``, ``rank``, ``alpha`` and ``scaling``, so that a reader needs no pattern logic. The maths follows
docs/peft.md (from "Scaling, rank and alpha" on), checked bit-for-bit against peft 0.21.2 by the test suite.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch

from adaptools import plugin
from adaptools.plugin import (
    Adapter,
    AdapterFormatError,
    BaseInfo,
    Finding,
    IncompatibleBaseError,
    LowRank,
    TensorUpdate,
    UnsupportedOperationError,
)

from ..peft.common import locate, replacement_update, weight_layout
from .config import (
    BASE_MUTATING_INITS,
    ROLES,
    UNMERGEABLE_FIELDS,
    lora_rank_alpha,
    pattern_rule_differences,
    scaling_for,
    token_indices,
)
from .experts import expert_modules, module_entry
from .experts import merge_updates as expert_merge_updates
from .initialization import RECOMPUTABLE_INITS, initial_factors, initialize, to_plain
from .legacy import enabled_blocks, merged_b, merged_out_features, merged_shapes_problem, portable_pattern_keys
from .lint import RULES, lint
from .runtime import applied
from .unmerge import preimages, unmerge_refusal


class LoRA(plugin.AdapterMethod, plugin.Mergeable, plugin.LowRankAlgebra, plugin.Initializable,
           plugin.RuntimeApplicable, plugin.PlainConvertible):
    name = "lora"
    description = "Low-rank adaptation (PEFT LORA): rsLoRA, DoRA, patterns, embeddings, biases, tokens"
    plain_method = "lora"
    unsupported = {"bake": "a LoRA has nothing to bake: its factors are what is served"}
    conditional = {"unmerge": "plain deltas only: not DoRA, OLoRA/PiSSA-style inits, replaced modules or tokens"}
    roles = ROLES
    peft_types = ("LORA",)
    peft_roles = {
        "lora_A.weight": "lora_A",
        "lora_B.weight": "lora_B",
        "lora_B.bias": "lora_bias",
        "lora_embedding_A": "lora_embedding_A",
        "lora_embedding_B": "lora_embedding_B",
        "lora_magnitude_vector": "lora_magnitude",
        "token_adapter.trainable_tokens_delta": "trainable_tokens",
    }

    # --- config -------------------------------------------------------------------------------------

    def from_peft(self, peft_config: dict[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        """PEFT config -> canonical config: the same fields plus per-module ``modules``."""
        config = dict(peft_config)
        modules: dict[str, dict[str, Any]] = {}
        enable = enabled_blocks(config)
        fused = expert_modules(config, shapes)  # ParamWrapper levels (experts.py)
        alpha: Any  # a malformed config's lora_alpha is kept as it is (lint reports it)
        for name, shape in shapes.items():
            module, _, role = name.rpartition(".")
            if role not in ("lora_A", "lora_embedding_A") or not shape:
                continue  # a 0-d tensor: lint reports it (LORA022)
            if module in fused:
                modules[module] = module_entry(config, fused[module], shape)
                continue
            try:
                rank, alpha = lora_rank_alpha(config, module)
                # peft 0.2.0's enable_lora scales by the config's r; A holds r per enabled block
                scaling: float | None = scaling_for(config, rank if enable else int(shape[0]), alpha)
                if enable:
                    rank = int(shape[0])
            except (TypeError, ValueError, ZeroDivisionError, plugin.InputError):
                # a malformed config: lint reports it (LORA001, LORA020)
                rank, alpha, scaling = int(shape[0]), config.get("lora_alpha"), None
            kind = "embedding" if role == "lora_embedding_A" else ("conv" if len(shape) > 2 else "linear")
            modules[module] = {"kind": kind, "rank": int(shape[0]), "alpha": alpha, "scaling": scaling}
            if rank != shape[0]:
                modules[module]["config_rank"] = rank
        config["modules"] = modules
        return config

    def to_peft(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """Canonical config -> PEFT adapter_config.json fields."""
        return {k: v for k, v in config.items() if k != "modules"}

    # --- validation and lint ---------------------------------------------------------------------------

    rules = RULES
    check_only = frozenset({"LORA023"})

    def lint(self, adapter: Adapter, base: BaseInfo | None = None, *, check_values: bool = True) -> list[Finding]:
        return lint(adapter, base, check_values=check_values)

    def summary(self, adapter: Adapter) -> dict[str, Any]:
        config = adapter.config
        modules = config.get("modules", {})
        ranks = sorted({m["rank"] for m in modules.values() if m.get("rank") is not None})
        kinds: dict[str, int] = {}
        for m in modules.values():
            kinds[m["kind"]] = kinds.get(m["kind"], 0) + 1
        replaced = sorted(n.rpartition(".")[0] + "." + n.rpartition(".")[2][len("replace_"):]
                          for n in adapter.tensor_names() if n.rpartition(".")[2].startswith("replace_"))
        return {
            "rank": ranks[0] if len(ranks) == 1 else ranks,
            "lora_alpha": config.get("lora_alpha"),
            "use_rslora": bool(config.get("use_rslora")),
            "use_dora": bool(config.get("use_dora")),
            "lora_bias": bool(config.get("lora_bias")),
            "init_lora_weights": config.get("init_lora_weights", True),
            "target_modules": config.get("target_modules"),
            "target_parameters": config.get("target_parameters"),
            "expert_parameters": {m["parameter"] or name: m["experts"] for name, m in sorted(modules.items())
                                  if m.get("kind") == "experts"},
            "adapted_modules": len(modules),
            "module_kinds": kinds,
            "replaced_tensors": replaced,
            "trainable_token_indices": config.get("trainable_token_indices"),
            "model_family": config.get("model_family"),  # image-model LoRAs (docs/diffusion.md)
            "components": config.get("components"),
        }

    # --- merge ---------------------------------------------------------------------------------------

    def refusal(self, operation: str, adapter: Adapter) -> str | None:
        """Why this adapter cannot be merged, unmerged or applied as plain LoRA, or None."""
        if operation == "unmerge":
            return self.refusal("merge", adapter) or unmerge_refusal(adapter)
        if operation not in ("merge", "apply"):
            return None
        config = adapter.config
        init = config.get("init_lora_weights")
        if operation == "apply" and isinstance(init, str) and init.lower().startswith(BASE_MUTATING_INITS):
            return (f"init_lora_weights={init!r}: the adapter applies to a modified base; convert it first "
                    "(convert --to lora --base BASE)")
        if isinstance(init, str) and init.lower().startswith(BASE_MUTATING_INITS) and init not in RECOMPUTABLE_INITS:
            return (f"init_lora_weights={init!r} trained on a modified base that cannot be recomputed from the "
                    "original; convert it to plain LoRA with the initial adapter first (convert --to lora "
                    "--initial INIT)")
        if init in RECOMPUTABLE_INITS and (config.get("fan_in_fan_out") or config.get("use_dora")):
            return f"init_lora_weights={init!r} with fan_in_fan_out or DoRA is not supported yet"
        for key, why in UNMERGEABLE_FIELDS.items():
            if config.get(key):
                return f"{key} is set: {why}"
        if config.get("target_parameters"):
            for key in ("use_dora", "lora_bias", "fan_in_fan_out"):
                if config.get(key):  # PEFT's ParamWrapper refuses them too
                    return f"{key} with target_parameters (fused MoE experts) has no meaning in PEFT"
        if config.get("layer_replication"):
            return "layer_replication is not supported yet"
        return None

    def merge_warnings(self, adapter: Adapter) -> list[str]:
        """What a merge should tell the user it assumed: rank/alpha patterns that peft 0.6 to 0.14 read
        differently, when the config does not say which peft saved it (the rule of lint LORA021)."""
        config = adapter.config
        try:
            differences = pattern_rule_differences(config, sorted(config.get("modules") or {}))
        except plugin.InputError:
            return []  # an unusable pattern: validation refuses the adapter with the reason
        if not differences:
            return []
        more = f" (and {len(differences) - 1} more)" if len(differences) > 1 else ""
        return [f"rank_pattern and alpha_pattern give {differences[0]}{more}; merged with today's rule, as "
                "the config does not record peft_version (set it to the version that trained the adapter)"]

    def merge_updates(self, adapter: Adapter, base: BaseInfo, weight: float = 1.0) -> list[TensorUpdate]:
        self.require("merge", adapter)
        replace, deltas, tokens = [], [], []
        for module, roles in adapter.modules().items():
            for role, name in roles.items():
                if role.startswith("replace_"):
                    replace.append(replacement_update(adapter, base, module, role[len("replace_"):], name))
            if "lora_A" in roles and self._is_expert(adapter, module):
                deltas.extend(expert_merge_updates(adapter, base, module, roles, weight))
            elif "lora_A" in roles or "lora_embedding_A" in roles:
                deltas.extend(self._delta_updates(adapter, base, module, roles, weight))
            if "trainable_tokens" in roles:
                tokens.append(self._token_update(adapter, base, module, roles["trainable_tokens"]))
        return replace + deltas + tokens

    @staticmethod
    def _is_expert(adapter: Adapter, module: str) -> bool:
        info = (adapter.config.get("modules") or {}).get(module)
        return isinstance(info, dict) and info.get("kind") == "experts"

    def unmerge_updates(self, adapter: Adapter, base: BaseInfo, weight: float = 1.0) -> list[TensorUpdate]:
        """MERGED minus the very delta the merge added (computed by the merge's own updates), rounded once and
        nudged where needed to a base that merges back to MERGED bit for bit: the original wherever the
        merge's rounding kept it (unmerge.py, docs/unmerge.md). Refuses what cannot be undone."""
        self.require("unmerge", adapter)
        return preimages(self.merge_updates(adapter, base, weight), base)

    def _delta_updates(self, adapter: Adapter, base: BaseInfo, module: str, roles: dict[str, str],
                       weight: float) -> list[TensorUpdate]:
        config = adapter.config
        embedding = "lora_embedding_A" in roles
        a_name = roles["lora_embedding_A" if embedding else "lora_A"]
        b_name = roles["lora_embedding_B" if embedding else "lora_B"]
        target = locate(adapter, base, module, "weight", a_name)
        base_shape = base.find(target).shape  # type: ignore[union-attr]
        if "replace_weight" in roles:  # a saved (possibly resized) base layer is what the delta lands on
            base_shape = adapter.info(roles["replace_weight"]).shape
        a_shape, b_shape = adapter.info(a_name).shape, adapter.info(b_name).shape
        enable = None if embedding else enabled_blocks(config)
        if enable:  # peft 0.2.0 MergedLinear: a block-structured B over the fused projection's outputs
            problem = merged_shapes_problem(config, tuple(a_shape), tuple(b_shape))
            if problem:
                raise AdapterFormatError(problem, **adapter.where(b_name),
                                         hint="the config does not belong to these weights")
            b_shape = (merged_out_features(config, tuple(b_shape)), a_shape[0])
        rank, alpha = lora_rank_alpha(config, module)
        s = scaling_for(config, rank, alpha) * weight
        if embedding:
            layout = "embedding"
            expected = (a_shape[1], b_shape[0])
            ok = tuple(base_shape) == expected
        elif len(a_shape) > 2:
            layout = "conv"
            ok = len(base_shape) == len(a_shape) and base_shape[0] == b_shape[0] and base_shape[1] == a_shape[1]
        else:
            found = weight_layout(tuple(base_shape), b_shape[0], a_shape[1], bool(config.get("fan_in_fan_out")))
            layout, ok = found or "linear", found is not None
        if not ok:
            raise IncompatibleBaseError(
                f"LoRA factors {list(a_shape)} x {list(b_shape)} do not fit base {target} {list(base_shape)}",
                **adapter.where(a_name),
                hint="the adapter was made for another model size")
        magnitude = roles.get("lora_magnitude")

        def read_factors(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
            a = adapter.tensor(a_name).to(device).float()
            b = adapter.tensor(b_name).to(device).float()
            return a, (merged_b(config, a, b) if enable else b)

        def delta(device: torch.device) -> torch.Tensor:
            a, b = read_factors(device)
            if layout == "embedding":
                return s * (b @ a).T
            if layout == "conv":
                return s * (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(base_shape)
            d = s * (b @ a)
            return d.T if layout == "fan_in_fan_out" else d

        init = config.get("init_lora_weights")
        recompute_init: str | None = init if init in RECOMPUTABLE_INITS and layout == "linear" else None
        recompute = recompute_init is not None

        def fn(current: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
            d = delta(current.device)
            if recompute_init is not None:
                # trained on W - s·B0A0, so W + s(BA - B0A0) (docs/peft.md, "OLoRA and PiSSA")
                b0, a0 = initial_factors(recompute_init, original, rank, s / weight if weight else s)
                d = d - (s * b0) @ a0
            if magnitude is None:
                return current + d
            # DoRA (docs/peft.md, "DoRA"): the norm is of the *original* weight plus this delta.
            m = adapter.tensor(magnitude).to(current.device).float()
            if layout == "embedding":
                factor = (m / (original + d).norm(p=2, dim=0)).reshape(1, -1)
            elif layout == "conv":
                factor = (m.reshape(-1) / (original + d).flatten(1).norm(p=2, dim=1))
                factor = factor.reshape(-1, *([1] * (original.dim() - 1)))
            elif layout == "fan_in_fan_out":
                factor = (m / (original + d).norm(p=2, dim=0)).reshape(1, -1)
            else:
                factor = (m / (original + d).norm(p=2, dim=1)).reshape(-1, 1)
            merged: torch.Tensor = factor * (current + d)  # (Tensor.norm is unannotated in torch)
            return merged if weight == 1.0 else current + weight * (merged - current)

        rows = row_delta = None
        if layout == "linear" and magnitude is None and not recompute:
            factors: dict[str, torch.Tensor] = {}
            lock = threading.Lock()  # the merge calls rows() from several threads

            def row_delta(sl: slice, out: torch.Tensor) -> torch.Tensor:
                # The same arithmetic as fn on a block of rows: (B[rows] @ A) * s, into the engine's scratch.
                with lock:
                    if not factors:  # read once per merge, not once per block
                        factors["a"], factors["b"] = read_factors(out.device)
                return torch.mm(factors["b"][sl], factors["a"], out=out).mul_(s)

            def rows(current: torch.Tensor, sl: slice) -> torch.Tensor:
                return current.add_(row_delta(sl, torch.empty_like(current)))

        updates = [TensorUpdate(target, "delta", fn, source=f"{a_name}, {b_name}", rows=rows,
                                row_delta=row_delta,
                                needs_original=magnitude is not None or recompute)]
        if "lora_bias" in roles:
            bias_name = roles["lora_bias"]
            bias_target = base.locate(module, "bias")
            if bias_target is None:
                raise IncompatibleBaseError(f"lora_bias needs a bias on {module}, and the base has none",
                                            **adapter.where(bias_name))
            updates.append(TensorUpdate(
                bias_target, "delta",
                lambda current, original: current + s * adapter.tensor(bias_name).to(current.device).float(),
                source=bias_name))
        return updates

    def _token_update(self, adapter: Adapter, base: BaseInfo, module: str, name: str) -> TensorUpdate:
        target = locate(adapter, base, module, "weight", name)
        indices = torch.tensor(token_indices(adapter.config, module) or [], dtype=torch.long)

        def fn(current: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
            out = current.clone()
            out[indices.to(current.device)] = adapter.tensor(name).to(current.device).float()
            return out

        return TensorUpdate(target, "replace_rows", fn, source=name)

    # --- algebra: the delta as a low-rank product ------------------------------------------------------

    def low_rank(self, adapter: Adapter) -> dict[str, LowRank]:
        """(s·B, A) per module in float64; DoRA and lora_bias have no such form (refused, naming why)."""
        config = adapter.config
        if config.get("use_dora"):
            raise UnsupportedOperationError("DoRA deltas are not low-rank products (the magnitude rescales "
                                            "W + BA row by row); merge first, or extract a LoRA from the result",
                                            path=adapter.source)
        factors = {}
        for module, roles in adapter.modules().items():
            if "lora_bias" in roles:
                raise UnsupportedOperationError("lora_bias adds a bias delta that is not a low-rank product",
                                                **adapter.where(roles["lora_bias"]))
            embedding = "lora_embedding_A" in roles
            a_role, b_role = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
            if a_role not in roles:
                continue
            if self._is_expert(adapter, module):
                raise UnsupportedOperationError("a fused MoE expert delta is one low-rank product per expert, "
                                                "which adapter algebra does not handle yet",
                                                **adapter.where(roles[a_role]))
            rank, alpha = lora_rank_alpha(config, module)
            s = scaling_for(config, rank, alpha)
            a = adapter.tensor(roles[a_role]).double()
            b = adapter.tensor(roles[b_role]).double()
            if enabled_blocks(config) and not embedding:
                problem = merged_shapes_problem(config, tuple(a.shape), tuple(b.shape))
                if problem:
                    raise AdapterFormatError(problem, **adapter.where(roles[b_role]))
                b = merged_b(config, a, b)
            if a.dim() > 2:  # a conv LoRA: A the conv [r, in, kh, kw], B a 1x1 conv [out, r, 1, 1]
                if b.dim() != a.dim() or any(int(k) != 1 for k in b.shape[2:]):
                    raise UnsupportedOperationError(f"conv LoRA whose B has kernel {tuple(b.shape[2:])}: adapter "
                                                    "algebra needs B to be 1x1", **adapter.where(roles[b_role]))
                factors[module] = LowRank(b.flatten(1) * s, a.flatten(1), "conv", tuple(int(k) for k in a.shape[2:]))
                continue
            factors[module] = LowRank(b * s, a, "embedding" if embedding else "linear")
        return factors

    def from_low_rank(self, template: Adapter | None, factors: dict[str, LowRank],
                      extra: dict[str, torch.Tensor] | None = None) -> Adapter:
        """A plain LoRA (scale 1 everywhere: alpha = r per module, no rsLoRA) holding ``factors`` in fp32."""
        tensors: dict[str, torch.Tensor] = {}
        ranks = {}
        for module, f in factors.items():
            a_role, b_role = ("lora_embedding_A", "lora_embedding_B") if f.kind == "embedding" else ("lora_A", "lora_B")
            a, b = f.a, f.b
            if f.kernel:  # a conv module: back to PEFT's [r, in, kh, kw] and 1x1 [out, r, 1, 1]
                a = a.reshape(f.rank, -1, *f.kernel)
                b = b.reshape(b.shape[0], f.rank, *(1,) * len(f.kernel))
            tensors[f"{module}.{a_role}"] = a.float().contiguous()
            tensors[f"{module}.{b_role}"] = b.float().contiguous()
            ranks[module] = f.rank
        tensors.update(extra or {})
        default = max(set(ranks.values()), key=list(ranks.values()).count) if ranks else 8
        had = template.config if template is not None else {}
        # Only the fields the input had (peft before 0.8 refuses a config with a field it does not know),
        # and pattern keys every peft since 0.6 matches the same way (legacy.portable_pattern_keys).
        config = {k: v for k, v in had.items() if k not in ("modules", "rank_pattern", "alpha_pattern",
                                                               "enable_lora")}
        config.update({"r": default, "lora_alpha": default})
        for key, plain in (("use_rslora", False), ("use_dora", False), ("lora_bias", False),
                           ("init_lora_weights", True)):
            if key in had:
                config[key] = plain
        keys = portable_pattern_keys(sorted(ranks))
        patterns = {keys[m]: r for m, r in sorted(ranks.items()) if r != default}
        if patterns or "rank_pattern" in had or "alpha_pattern" in had:
            config["rank_pattern"], config["alpha_pattern"] = patterns, dict(patterns)
        config["target_modules"] = sorted(factors) or config.get("target_modules")  # exact module paths
        shapes = {name: tuple(tensors[name].shape) for name in
                  (f"{m}.{'lora_embedding_A' if f.kind == 'embedding' else 'lora_A'}" for m, f in factors.items())}
        config = self.from_peft(config, shapes)
        return Adapter(self.name, config, plugin.MemoryStore(tensors),
                       base=template.base if template is not None else plugin.BaseRef(),
                       provenance=dict(template.provenance) if template is not None else {})

    # --- base-mutating inits (OLoRA, PiSSA): init and conversion to plain LoRA (initialization.py) -------------

    def initialize(self, base: BaseInfo, read: Callable[[str], torch.Tensor], options: Mapping[str, Any]) -> Adapter:
        return initialize(self, base, read, options)

    def to_plain(self, adapter: Adapter, base: BaseInfo | None, read: Callable[[str], torch.Tensor] | None,
                 initial: Adapter | None, options: Mapping[str, Any] | None = None) -> Adapter:
        return to_plain(self, adapter, base, read, initial)

    # --- runtime application (unmerged), for validation -----------------------------------------

    def apply(self, adapter: Adapter, model: torch.nn.Module) -> Any:
        self.require("apply", adapter)
        return applied(adapter, model)
