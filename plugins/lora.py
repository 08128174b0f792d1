"""LoRA, every PEFT variant: the tensors, the config rules and the exact merge math.

Written as a third-party plugin would be: it imports only the public ``adaptools`` API.

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
``shared/docs/peft-format.md`` §3, checked bit-for-bit against peft 0.21.2 by the test suite.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

import adaptools
from adaptools import (
    Adapter,
    AdapterFormatError,
    BaseInfo,
    IncompatibleBaseError,
    TensorUpdate,
    UnsupportedOperationError,
)

FACTOR_ROLES = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
ROLES = FACTOR_ROLES + ("lora_bias", "lora_magnitude", "trainable_tokens")
#: init_lora_weights values whose training started from a modified base (peft-format.md §4).
BASE_MUTATING_INITS = ("olora", "pissa", "corda", "lora_ga", "loftq")
#: LoRA variants peft cannot merge, and why.
UNMERGEABLE_FIELDS = {
    "alora_invocation_tokens": "aLoRA activates only after its invocation tokens, so it has no fixed delta",
    "arrow_config": "Arrow routes between adapters per token",
    "kasa_config": "KaSA truncates the base weight",
}


def pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """PEFT's rank/alpha pattern rule: the first key K (dict order) with ``re.match(r"(.*\\.)?(K)$")``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def module_rank_alpha(config: Mapping[str, Any], module: str) -> tuple[int, float]:
    """The rank and alpha PEFT gives ``module`` (rank_pattern / alpha_pattern, else r / lora_alpha)."""
    rank_patterns = config.get("rank_pattern") or {}
    alpha_patterns = config.get("alpha_pattern") or {}
    rk = pattern_key(rank_patterns, module)
    ak = pattern_key(alpha_patterns, module)
    rank = rank_patterns[rk] if rk is not None else config.get("r", 8)
    alpha = alpha_patterns[ak] if ak is not None else config.get("lora_alpha", 8)
    return int(rank), alpha


def scaling_for(config: Mapping[str, Any], rank: int, alpha: float) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def is_targeted(config: Mapping[str, Any], module: str) -> bool:
    """PEFT's target_modules / exclude_modules / layers_to_transform matching for one module path."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, module):
                return False
        elif module in exclude or any(module.endswith(f".{e}") for e in exclude):
            return False
    targets = config.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    if module in targets:
        return True
    if not any(module.endswith(f".{t}") for t in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    patterns = config.get("layers_pattern")
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        for p in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module)
            if match:
                break
    if not match:
        return False
    idx = int(match.group("idx"))
    return idx == layers if isinstance(layers, int) else idx in layers


def token_indices(config: Mapping[str, Any], module: str) -> list[int] | None:
    """The trainable-token row indices for an embedding module (list form targets the input embedding)."""
    spec = config.get("trainable_token_indices")
    if spec is None:
        return None
    if isinstance(spec, list):
        return list(spec)
    for name, indices in spec.items():
        if module == name or module.endswith(f".{name}"):
            return list(indices)
    return None


def _finite(adapter: Adapter, name: str, tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise AdapterFormatError(f"{bad} NaN/Inf value(s)", **adapter.where(name),
                                 hint="the adapter diverged in training or the file is corrupt")


class LoRA(adaptools.AdapterMethod):
    name = "lora"
    description = "Low-rank adaptation (PEFT LORA): rsLoRA, DoRA, patterns, embeddings, biases, tokens"
    operations = frozenset({"info", "convert", "merge", "apply"})
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
        for name, shape in shapes.items():
            module, _, role = name.rpartition(".")
            if role not in ("lora_A", "lora_embedding_A"):
                continue
            rank, alpha = module_rank_alpha(config, module)
            kind = "embedding" if role == "lora_embedding_A" else ("conv" if len(shape) > 2 else "linear")
            modules[module] = {"kind": kind, "rank": int(shape[0]), "alpha": alpha,
                               "scaling": scaling_for(config, int(shape[0]), alpha)}
            if rank != shape[0]:
                modules[module]["config_rank"] = rank
        config["modules"] = modules
        return config

    def to_peft(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """Canonical config -> PEFT adapter_config.json fields."""
        return {k: v for k, v in config.items() if k != "modules"}

    # --- validation ---------------------------------------------------------------------------------

    def validate(self, adapter: Adapter, *, check_values: bool = True) -> None:
        config = adapter.config
        if config.get("target_parameters"):
            # Reading works; tensors of ParamWrapper targets are keyed by module, not parameter.
            pass
        for module, roles in adapter.modules().items():
            for role, name in roles.items():
                if role not in ROLES and not role.startswith("replace_"):
                    raise AdapterFormatError(f"unknown LoRA tensor role {role!r}", **adapter.where(name),
                                             hint=f"known roles: {', '.join(ROLES)}, replace_<param>")
                info = adapter.info(name)
                if not info.dtype.startswith(("F", "BF")):
                    raise AdapterFormatError(f"dtype {info.dtype} is not floating point", **adapter.where(name))
            self._validate_module(adapter, module, roles)
        if check_values:
            for name in adapter.tensor_names():
                _finite(adapter, name, adapter.tensor(name))

    def _validate_module(self, adapter: Adapter, module: str, roles: dict[str, str]) -> None:
        config = adapter.config

        def fail(message: str, role: str, hint: str | None = None) -> None:
            raise AdapterFormatError(message, hint=hint, **adapter.where(roles[role]))

        for a_role, b_role in (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B")):
            if (a_role in roles) != (b_role in roles):
                present, absent = (a_role, b_role) if a_role in roles else (b_role, a_role)
                fail(f"{present} has no matching {absent} for module {module}", present,
                     "the adapter file is incomplete")
            if a_role not in roles:
                continue
            a, b = adapter.info(roles[a_role]).shape, adapter.info(roles[b_role]).shape
            if len(a) < 2 or len(b) < 2 or a[0] != b[1]:
                fail(f"{a_role} {list(a)} and {b_role} {list(b)} do not share a rank", a_role)
            rank, _ = module_rank_alpha(config, module)
            if a[0] != rank:
                fail(f"config gives rank {rank} (r / rank_pattern) but the tensor has rank {a[0]}", a_role,
                     "the config does not belong to these weights")
            if config.get("target_modules") is not None and not config.get("target_parameters") \
                    and not is_targeted(config, module):
                fail(f"module {module} has LoRA weights but target_modules does not select it", a_role)
        has_factors = "lora_A" in roles or "lora_embedding_A" in roles
        if "lora_magnitude" in roles:
            if not config.get("use_dora"):
                fail("DoRA magnitude present but use_dora is false", "lora_magnitude")
            if not has_factors:
                fail("DoRA magnitude without lora_A/lora_B", "lora_magnitude")
        elif config.get("use_dora") and has_factors:
            raise AdapterFormatError(f"use_dora is true but module {module} has no magnitude vector",
                                     path=adapter.source, tensor=f"{module}.lora_magnitude")
        if "lora_bias" in roles:
            if not config.get("lora_bias"):
                fail("lora_B.bias present but lora_bias is false in the config", "lora_bias")
            if "lora_B" not in roles or adapter.info(roles["lora_bias"]).shape[0] != \
                    adapter.info(roles["lora_B"]).shape[0]:
                fail("lora_B.bias does not match lora_B's output size", "lora_bias")
        if "trainable_tokens" in roles:
            indices = token_indices(config, module)
            if indices is None:
                fail("trainable token rows present but trainable_token_indices does not name this module",
                     "trainable_tokens")
            rows = adapter.info(roles["trainable_tokens"]).shape[0]
            if rows != len(indices or []):
                fail(f"{rows} trainable token rows but {len(indices or [])} indices in the config",
                     "trainable_tokens")

    # --- info ---------------------------------------------------------------------------------------

    def summary(self, adapter: Adapter) -> dict[str, Any]:
        config = adapter.config
        modules = config.get("modules", {})
        ranks = sorted({m["rank"] for m in modules.values()})
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
            "adapted_modules": len(modules),
            "module_kinds": kinds,
            "replaced_tensors": replaced,
            "trainable_token_indices": config.get("trainable_token_indices"),
        }

    # --- merge ---------------------------------------------------------------------------------------

    def merge_refusal(self, adapter: Adapter) -> str | None:
        """Why this adapter cannot be merged as plain LoRA, or None."""
        config = adapter.config
        init = config.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(BASE_MUTATING_INITS):
            return (f"init_lora_weights={init!r} trained on a modified base; merging it onto the original "
                    "base as plain LoRA would be wrong (convert it to plain LoRA first)")
        for key, why in UNMERGEABLE_FIELDS.items():
            if config.get(key):
                return f"{key} is set: {why}"
        if config.get("target_parameters"):
            return "target_parameters (fused MoE expert parameters) are not supported yet"
        if config.get("layer_replication"):
            return "layer_replication is not supported yet"
        return None

    def merge_updates(self, adapter: Adapter, base: BaseInfo, weight: float = 1.0) -> list[TensorUpdate]:
        why = self.merge_refusal(adapter)
        if why:
            raise UnsupportedOperationError(f"cannot merge: {why}", path=adapter.source)
        replace, deltas, tokens = [], [], []
        for module, roles in adapter.modules().items():
            for role, name in roles.items():
                if role.startswith("replace_"):
                    replace.append(self._replacement(adapter, base, module, role[len("replace_"):], name))
            if "lora_A" in roles or "lora_embedding_A" in roles:
                deltas.extend(self._delta_updates(adapter, base, module, roles, weight))
            if "trainable_tokens" in roles:
                tokens.append(self._token_update(adapter, base, module, roles["trainable_tokens"]))
        return replace + deltas + tokens

    def _locate(self, adapter: Adapter, base: BaseInfo, module: str, param: str, tensor: str) -> str:
        found = base.locate(module, param)
        if found is None:
            raise IncompatibleBaseError(
                f"the adapter changes {module}.{param} but the base has no such tensor",
                **adapter.where(tensor),
                hint="the adapter was made for another model (check base_model_name_or_path)")
        return found

    def _replacement(self, adapter: Adapter, base: BaseInfo, module: str, param: str, name: str) -> TensorUpdate:
        target = self._locate(adapter, base, module, param, name)
        shape = adapter.info(name).shape
        base_shape = base.find(target).shape  # type: ignore[union-attr]
        if len(shape) != len(base_shape) or (shape[1:] != base_shape[1:]):
            raise IncompatibleBaseError(f"replacement shape {list(shape)} does not fit base {list(base_shape)}",
                                        **adapter.where(name))

        def fn(current: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
            return adapter.tensor(name).to(current.device).float()

        # modules_to_save replaces one module's copy; a saved base layer (resized vocab) replaces the storage
        # itself, which a tied lm_head shares. PEFT matches modules_to_save with a plain endswith (§1.3).
        saved = [m for m in adapter.config.get("modules_to_save") or [] if module.endswith(m)]
        kind = "replace_module" if saved else "replace"
        return TensorUpdate(target, kind, fn, shape=shape if shape != base_shape else None, source=name)

    def _delta_updates(self, adapter: Adapter, base: BaseInfo, module: str, roles: dict[str, str],
                       weight: float) -> list[TensorUpdate]:
        config = adapter.config
        embedding = "lora_embedding_A" in roles
        a_name = roles["lora_embedding_A" if embedding else "lora_A"]
        b_name = roles["lora_embedding_B" if embedding else "lora_B"]
        target = self._locate(adapter, base, module, "weight", a_name)
        base_shape = base.find(target).shape  # type: ignore[union-attr]
        if "replace_weight" in roles:  # a saved (possibly resized) base layer is what the delta lands on
            base_shape = adapter.info(roles["replace_weight"]).shape
        a_shape, b_shape = adapter.info(a_name).shape, adapter.info(b_name).shape
        rank, alpha = module_rank_alpha(config, module)
        s = scaling_for(config, rank, alpha) * weight
        if embedding:
            layout = "embedding"
            expected = (a_shape[1], b_shape[0])
            ok = tuple(base_shape) == expected
        elif len(a_shape) > 2:
            layout = "conv"
            ok = len(base_shape) == len(a_shape) and base_shape[0] == b_shape[0] and base_shape[1] == a_shape[1]
        else:
            out_in, in_out = (b_shape[0], a_shape[1]), (a_shape[1], b_shape[0])
            if tuple(base_shape) == out_in and (out_in != in_out or not config.get("fan_in_fan_out")):
                layout, ok = "linear", True
            elif tuple(base_shape) == in_out:
                layout, ok = "fan_in_fan_out", True
            else:
                layout, ok = "linear", False
        if not ok:
            raise IncompatibleBaseError(
                f"LoRA factors {list(a_shape)} x {list(b_shape)} do not fit base {target} {list(base_shape)}",
                **adapter.where(a_name),
                hint="the adapter was made for another model size")
        magnitude = roles.get("lora_magnitude")

        def delta(device: torch.device) -> torch.Tensor:
            a = adapter.tensor(a_name).to(device).float()
            b = adapter.tensor(b_name).to(device).float()
            if layout == "embedding":
                return s * (b @ a).T
            if layout == "conv":
                return s * (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(base_shape)
            d = s * (b @ a)
            return d.T if layout == "fan_in_fan_out" else d

        def fn(current: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
            d = delta(current.device)
            if magnitude is None:
                return current + d
            # DoRA (peft-format.md §3.6): the norm is of the *original* weight plus this delta.
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
            merged = factor * (current + d)
            return merged if weight == 1.0 else current + weight * (merged - current)

        rows = None
        if layout == "linear" and magnitude is None:
            factors: dict[str, torch.Tensor] = {}
            lock = threading.Lock()  # the merge calls rows() from several threads

            def rows(current: torch.Tensor, sl: slice) -> torch.Tensor:
                # The same arithmetic as fn on a block of rows: (B[rows] @ A) * s, then one add.
                with lock:
                    if not factors:  # read once per merge, not once per block
                        factors["a"] = adapter.tensor(a_name).to(current.device).float()
                        factors["b"] = adapter.tensor(b_name).to(current.device).float()
                return current.add_((factors["b"][sl] @ factors["a"]).mul_(s))

        updates = [TensorUpdate(target, "delta", fn, source=f"{a_name}, {b_name}", rows=rows,
                                needs_original=magnitude is not None)]
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
        target = self._locate(adapter, base, module, "weight", name)
        indices = torch.tensor(token_indices(adapter.config, module) or [], dtype=torch.long)

        def fn(current: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
            out = current.clone()
            out[indices.to(current.device)] = adapter.tensor(name).to(current.device).float()
            return out

        return TensorUpdate(target, "replace_rows", fn, source=name)

    # --- runtime application (unmerged), for validation -----------------------------------------

    def apply(self, adapter: Adapter, model: torch.nn.Module) -> Any:
        why = self.merge_refusal(adapter)
        if why:
            raise UnsupportedOperationError(f"cannot apply: {why}", path=adapter.source)
        return _applied(self, adapter, model)


@contextmanager
def _applied(method: LoRA, adapter: Adapter, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Forward hooks that add each module's LoRA path to its output, as PEFT's unmerged forward does."""
    named = dict(model.named_modules())
    handles = []
    saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    config = adapter.config

    def find(module: str) -> torch.nn.Module:
        for candidate in (module, module.partition(".")[2], f"model.{module}"):
            if candidate in named:
                return named[candidate]
        raise IncompatibleBaseError(f"the model has no module {module}", path=adapter.source)

    try:
        for module_name, roles in adapter.modules().items():
            layer = find(module_name)
            for role, tname in roles.items():
                if role.startswith("replace_") or role == "trainable_tokens":
                    param = getattr(layer, role[len("replace_"):] if role != "trainable_tokens" else "weight")
                    saved.append((param, param.data.clone()))
                    with torch.no_grad():
                        if role == "trainable_tokens":
                            rows = torch.tensor(token_indices(config, module_name) or [])
                            param.data[rows] = adapter.tensor(tname).to(param.dtype)
                        else:
                            param.data = adapter.tensor(tname).to(param.dtype)
            if "lora_A" in roles or "lora_embedding_A" in roles:
                handles.append(layer.register_forward_hook(_lora_hook(adapter, module_name, roles, layer)))
        yield model
    finally:
        for h in handles:
            h.remove()
        for param, value in reversed(saved):
            param.data = value


def _lora_hook(adapter: Adapter, module: str, roles: dict[str, str], layer: torch.nn.Module) -> Any:
    config = adapter.config
    rank, alpha = module_rank_alpha(config, module)
    s = scaling_for(config, rank, alpha)
    embedding = "lora_embedding_A" in roles
    a = adapter.tensor(roles["lora_embedding_A" if embedding else "lora_A"]).float()
    b = adapter.tensor(roles["lora_embedding_B" if embedding else "lora_B"]).float()
    bias = adapter.tensor(roles["lora_bias"]).float() if "lora_bias" in roles else None
    magnitude = adapter.tensor(roles["lora_magnitude"]).float() if "lora_magnitude" in roles else None
    weight = layer.weight
    transposed = not embedding and tuple(weight.shape) == (a.shape[1], b.shape[0]) and \
        (weight.shape[0] != weight.shape[1] or bool(config.get("fan_in_fan_out")))

    def hook(mod: torch.nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        if embedding:
            lora = torch.nn.functional.embedding(x, a.T) @ b.T * s
            if magnitude is not None:
                w = mod.weight.float()
                norm = (w + s * (b @ a).T).norm(p=2, dim=0)
                return ((output.float() + lora) * (magnitude / norm)).to(output.dtype)
            return (output.float() + lora).to(output.dtype)
        xf = x.float()
        lora = (xf @ a.T) @ b.T * s
        if bias is not None:
            lora = lora + s * bias
        if magnitude is None:
            return (output.float() + lora).to(output.dtype)
        w = mod.weight.float()
        w = w.T if transposed else w
        norm = (w + s * (b @ a)).norm(p=2, dim=1)
        factor = magnitude / norm
        layer_bias = getattr(mod, "bias", None)
        base_out = output.float() - (layer_bias.float() if layer_bias is not None else 0)
        result = factor * base_out + factor * ((xf @ a.T) @ b.T * s)
        if layer_bias is not None:
            result = result + layer_bias.float()
        if bias is not None:
            result = result + s * bias
        return result.to(output.dtype)

    return hook


@adaptools.hookimpl
def register_methods(register: Any) -> None:
    register(LoRA())
