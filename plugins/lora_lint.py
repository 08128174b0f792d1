"""LoRA's lint rules (``adaptools check``; ``load()`` refuses on the first error): what a PEFT LoRA
adapter can get wrong, from its config alone, its tensors, and against a base model's headers."""

from __future__ import annotations

from collections.abc import Callable

import torch

from adaptools import Adapter, BaseInfo, Finding

from .lora_config import BASE_MUTATING_INITS, ROLES, is_targeted, module_rank_alpha, token_indices

RULES = {
    "LORA001": ("error", "config field has the wrong type"),
    "LORA002": ("error", "tensor role unknown to LoRA"),
    "LORA003": ("error", "tensor dtype is not floating point"),
    "LORA004": ("error", "lora_A without lora_B (or the reverse)"),
    "LORA005": ("error", "lora_A and lora_B ranks differ"),
    "LORA006": ("error", "rank differs from r / rank_pattern"),
    "LORA007": ("error", "LoRA weights on a module target_modules does not select"),
    "LORA008": ("error", "DoRA magnitude and use_dora disagree"),
    "LORA009": ("error", "lora_B.bias and lora_bias disagree"),
    "LORA010": ("error", "trainable token rows and trainable_token_indices disagree"),
    "LORA011": ("error", "NaN or Inf values"),
    "LORA012": ("warning", "lora_B is all zero: the adapter was never trained"),
    "LORA013": ("warning", "scaling is implausible (alpha / rsLoRA mix-up)"),
    "LORA014": ("warning", "trained on a modified base (OLoRA, PiSSA, ...): do not merge as plain LoRA"),
    "LORA015": ("warning", "full tensor saved that the config does not explain"),
    "LORA016": ("error", "target module missing from the base"),
    "LORA017": ("error", "shape does not fit the base"),
    "LORA018": ("warning", "adapter on a tied embedding: merging changes both input and output embeddings"),
    "LORA019": ("error", "replacement tensor does not fit the base (vocabulary size)"),
}
FIXES = {
    "LORA001": "fix the field in adapter_config.json (see PEFT's LoraConfig)",
    "LORA002": "remove the tensor, or install the plugin of the method that uses it",
    "LORA003": "save the adapter in fp32, fp16 or bf16",
    "LORA004": "the adapter file is incomplete: save it again",
    "LORA005": "the adapter file is corrupt: save it again",
    "LORA006": "the config does not belong to these weights: ship the matching adapter_config.json",
    "LORA007": "add the module to target_modules or drop its tensors",
    "LORA008": "set use_dora to match the saved tensors",
    "LORA009": "set lora_bias to match the saved tensors",
    "LORA010": "make trainable_token_indices list one index per saved row",
    "LORA011": "the adapter diverged in training or the file is corrupt: retrain or re-save",
    "LORA012": "publish the trained checkpoint, not the initial one",
    "LORA013": "check lora_alpha against r (and use_rslora)",
    "LORA014": "adaptools merge recomputes olora/pissa inits; elsewhere convert it first (convert --to lora)",
    "LORA015": "list the module in modules_to_save, or drop the tensor",
    "LORA016": "use the base the adapter was trained on (base_model_name_or_path)",
    "LORA017": "use the base the adapter was trained on (model size)",
    "LORA018": "set ensure_weight_tying or untie the embeddings before training; adaptools merge unties",
    "LORA019": "resize the base's vocabulary to the adapter's",
}

def lint(adapter: Adapter, base: BaseInfo | None = None, *, check_values: bool = True) -> list[Finding]:
    findings: list[Finding] = []

    def add(rule: str, message: str, name: str | None = None, field: str | None = None,
            fix: str | None = None) -> None:
        where = adapter.where(name) if name else {"path": adapter.source, "tensor": None}
        findings.append(Finding(rule, RULES[rule][0], message, fix or FIXES[rule],
                                where["path"], where["tensor"], field))

    _lint_config(adapter, add)
    for module, roles in adapter.modules().items():
        for role, name in roles.items():
            if role not in ROLES and not role.startswith("replace_"):
                add("LORA002", f"unknown LoRA tensor role {role!r}", name,
                    fix=f"known roles: {', '.join(ROLES)}, replace_<param>")
            elif not adapter.info(name).dtype.startswith(("F", "BF")):
                add("LORA003", f"dtype {adapter.info(name).dtype} is not floating point", name)
        _lint_module(adapter, module, roles, add)
        if base is not None:
            _lint_against_base(adapter, base, module, roles, add)
    if check_values:
        for name in adapter.tensor_names():
            tensor = adapter.tensor(name)
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                add("LORA011", f"{int((~torch.isfinite(tensor)).sum())} NaN/Inf value(s)", name)
            elif name.endswith((".lora_B", ".lora_embedding_B")) and tensor.numel() and not bool(tensor.any()):
                add("LORA012", "lora_B is all zero", name)
    return findings

def _lint_config(adapter: Adapter, add: Callable[..., None]) -> None:
    config = adapter.config
    types = {"r": int, "lora_alpha": (int, float), "use_rslora": bool, "use_dora": bool,
             "fan_in_fan_out": bool, "rank_pattern": dict, "alpha_pattern": dict}
    for key, kind in types.items():
        value = config.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool) and kind is int):
            add("LORA001", f"{key} is {value!r}", field=key)
    if isinstance(config.get("r"), int) and config["r"] <= 0:
        add("LORA001", f"r is {config['r']}", field="r")
    targets = config.get("target_modules")
    if targets is not None and not isinstance(targets, (str, list)):
        add("LORA001", f"target_modules is {targets!r}", field="target_modules")
    for module, info in config.get("modules", {}).items():
        if isinstance(info.get("scaling"), (int, float)) and not 1 / 64 <= info["scaling"] <= 16:
            add("LORA013", f"module {module} has scaling {info['scaling']:g} (alpha {info['alpha']}, rank "
                f"{info['rank']}{', rsLoRA' if config.get('use_rslora') else ''})", field="lora_alpha")
            break
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_MUTATING_INITS):
        add("LORA014", f"init_lora_weights is {init!r}", field="init_lora_weights")

def _lint_module(adapter: Adapter, module: str, roles: dict[str, str], add: Callable[..., None]) -> None:
    config = adapter.config
    for a_role, b_role in (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B")):
        if (a_role in roles) != (b_role in roles):
            present, absent = (a_role, b_role) if a_role in roles else (b_role, a_role)
            add("LORA004", f"{present} has no matching {absent} for module {module}", roles[present])
            continue
        if a_role not in roles:
            continue
        a, b = adapter.info(roles[a_role]).shape, adapter.info(roles[b_role]).shape
        if len(a) < 2 or len(b) < 2 or a[0] != b[1]:
            add("LORA005", f"{a_role} {list(a)} and {b_role} {list(b)} do not share a rank", roles[a_role])
            continue
        rank, _ = module_rank_alpha(config, module)
        if a[0] != rank:
            add("LORA006", f"config gives rank {rank} (r / rank_pattern) but the tensor has rank {a[0]}",
                roles[a_role], field="r")
        if config.get("target_modules") is not None and not config.get("target_parameters") \
                and not is_targeted(config, module):
            add("LORA007", f"module {module} has LoRA weights but target_modules does not select it",
                roles[a_role], field="target_modules")
    has_factors = "lora_A" in roles or "lora_embedding_A" in roles
    if "lora_magnitude" in roles and not config.get("use_dora"):
        add("LORA008", "DoRA magnitude present but use_dora is false", roles["lora_magnitude"], field="use_dora")
    elif "lora_magnitude" not in roles and config.get("use_dora") and has_factors:
        add("LORA008", f"use_dora is true but module {module} has no magnitude vector",
            roles.get("lora_A") or roles.get("lora_embedding_A"), field="use_dora")
    if "lora_bias" in roles:
        if not config.get("lora_bias"):
            add("LORA009", "lora_B.bias present but lora_bias is false in the config", roles["lora_bias"],
                field="lora_bias")
        elif "lora_B" not in roles or adapter.info(roles["lora_bias"]).shape[0] != \
                adapter.info(roles["lora_B"]).shape[0]:
            add("LORA009", "lora_B.bias does not match lora_B's output size", roles["lora_bias"])
    if "trainable_tokens" in roles:
        indices = token_indices(config, module) or []
        rows = adapter.info(roles["trainable_tokens"]).shape[0]
        if rows != len(indices):
            add("LORA010", f"{rows} trainable token rows but {len(indices)} indices in the config",
                roles["trainable_tokens"], field="trainable_token_indices")
    saved = config.get("modules_to_save") or []
    bias_mode = config.get("bias", "none")
    for role, name in roles.items():
        if not role.startswith("replace_"):
            continue
        explained = (has_factors or any(module.endswith(m) for m in saved)
                     or (role == "replace_bias" and bias_mode in ("all", "lora_only")))
        if not explained:
            add("LORA015", f"full {role[len('replace_'):]} of {module} saved, but the config does not say why",
                name, field="modules_to_save")

def _lint_against_base(adapter: Adapter, base: BaseInfo, module: str, roles: dict[str, str],
                       add: Callable[..., None]) -> None:
    """Checks that need the base's config and safetensors headers (never its weights)."""
    for role, name in roles.items():
        param = "bias" if role == "lora_bias" else role[len("replace_"):] if role.startswith("replace_") \
            else "weight"
        target = base.locate(module, param)
        if target is None:
            add("LORA016", f"the base has no {module}.{param}", name)
            return
        shape, found = adapter.info(name).shape, base.find(target)
        if role.startswith("replace_") and found is not None and tuple(shape) != tuple(found.shape):
            add("LORA019", f"{list(shape)} replaces {target} {list(found.shape)}", name)
    target = base.locate(module, "weight")
    a_name = roles.get("lora_A") or roles.get("lora_embedding_A")
    b_name = roles.get("lora_B") or roles.get("lora_embedding_B")
    if not (a_name and b_name and target):
        return
    tied = target in base.aliases or target in base.aliases.values()
    if tied and not adapter.config.get("ensure_weight_tying"):
        add("LORA018", f"{module} shares its weight with the other embedding in the base", a_name)
    w = tuple(base.find(target).shape)  # type: ignore[union-attr]
    if "replace_weight" in roles:
        w = tuple(adapter.info(roles["replace_weight"]).shape)
    a, b = adapter.info(a_name).shape, adapter.info(b_name).shape
    fits = {(b[0], a[1]), (a[1], b[0])} if "lora_A" in roles else {(a[1], b[0])}
    if len(a) == 2 and len(b) == 2 and w not in fits:
        add("LORA017", f"LoRA factors {list(a)} x {list(b)} do not fit base {target} {list(w)}", a_name)

# --- info ---------------------------------------------------------------------------------------
