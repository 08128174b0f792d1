"""LoRA's lint rules (``adaptools check``; ``load()`` refuses on the first error): what a PEFT LoRA
adapter can get wrong, from its config alone, its tensors, and against a base model's headers."""

from __future__ import annotations

from adaptools import plugin
from adaptools.plugin import Adapter, BaseInfo, Finding

from ..peft.lint import CORRUPT, FOREIGN_CONFIG, INCOMPLETE, Lint, Rule, rule_table
from ..peft.matching import is_targeted
from .config import (
    BASE_MUTATING_INITS,
    ROLES,
    config_problems,
    lora_rank_alpha,
    pattern_rule_differences,
    token_indices,
)
from .experts import candidates, reach, targets, unwrapped
from .legacy import enabled_blocks, merged_out_features, merged_shapes_problem

TABLE = rule_table("LORA", {
    1: Rule("error", "config field has the wrong type or is out of range",
            "fix the field in adapter_config.json (see PEFT's LoraConfig)"),
    2: "role",
    3: Rule("error", "tensor dtype is not fp16, bf16, fp32 or fp64",
            "save the adapter in fp32, fp16 or bf16 (LoRA maths never runs on 8-bit floats or integers)"),
    4: Rule("error", "lora_A without lora_B (or the reverse)", INCOMPLETE),
    5: Rule("error", "lora_A and lora_B ranks differ", CORRUPT),
    6: Rule("error", "rank differs from r / rank_pattern", FOREIGN_CONFIG),
    7: Rule("error", "LoRA weights on a module target_modules does not select",
            "add the module to target_modules or drop its tensors"),
    8: Rule("error", "DoRA magnitude and use_dora disagree", "set use_dora to match the saved tensors"),
    9: Rule("error", "lora_B.bias and lora_bias disagree", "set lora_bias to match the saved tensors"),
    10: Rule("error", "trainable token rows and trainable_token_indices disagree",
             "make trainable_token_indices list one index per saved row"),
    11: "values", 12: "zero",
    13: Rule("warning", "scaling is implausible (alpha / rsLoRA mix-up)",
             "check lora_alpha against r (and use_rslora)"),
    14: Rule("warning", "trained on a modified base (OLoRA, PiSSA, ...): do not merge as plain LoRA",
             "adaptools merge recomputes olora/pissa inits; elsewhere convert it first (convert --to lora)"),
    15: Rule("warning", "full tensor saved that the config does not explain",
             "list the module in modules_to_save, or drop the tensor"),
    16: "missing", 17: "fit",
    18: Rule("warning", "adapter on a tied embedding: merging changes both input and output embeddings",
             "set ensure_weight_tying or untie the embeddings before training; adaptools merge unties"),
    19: Rule("error", "replacement tensor does not fit the base (vocabulary size)",
             "resize the base's vocabulary to the adapter's"),
    20: Rule("error", "a config regex is invalid or too slow to match",
             "fix the regular expression in adapter_config.json (Python re syntax, no catastrophic backtracking)"),
    21: Rule("warning", "rank/alpha patterns that peft 0.6 to 0.14 read differently",
             "set peft_version in adapter_config.json to the peft that trained the adapter"),
    22: Rule("error", "tensor has the wrong number of dimensions", CORRUPT),
    23: "inert",
    24: Rule("error", "MoE expert LoRA does not reach the base (target parameter missing, expert count or "
                      "shape mismatch)",
             "merge into the model the adapter was trained on; target_parameters and r must match its experts"),
}, method="LoRA", config="LoraConfig", zero="lora_B is all zero: the adapter was never trained")
RULES = TABLE.rules
#: Dimensions each role's tensor has (conv LoRA factors have more; peft 0.2.0's enable_lora lora_B has 3).
NDIM = {"lora_A": (2, 3, 4, 5), "lora_B": (2, 3, 4, 5), "lora_embedding_A": (2,), "lora_embedding_B": (2,),
        "lora_bias": (1,), "lora_magnitude": (1, 2, 3, 4, 5), "trainable_tokens": (2,)}
FULL_FLOATS = ("F64", "F32", "F16", "BF16")


def lint(adapter: Adapter, base: BaseInfo | None = None, *, check_values: bool = True) -> list[Finding]:
    report = Lint(adapter, TABLE)
    add = report.add
    config_ok = _lint_config(report)
    unusable = set()
    for module, roles in adapter.modules().items():
        for role, name in roles.items():
            info = adapter.info(name)
            if role not in ROLES and not role.startswith("replace_"):
                add("LORA002", f"unknown LoRA tensor role {role!r}", name,
                    fix=f"known roles: {', '.join(ROLES)}, replace_<param>")
            elif info.dtype not in FULL_FLOATS:
                add("LORA003", f"dtype {info.dtype} is not fp16, bf16, fp32 or fp64", name)
                unusable.add(name)
            elif len(info.shape) not in NDIM.get(role, range(1, 9)):
                add("LORA022", f"{role} has {len(info.shape)} dimensions {list(info.shape)}", name)
                unusable.add(name)
        if unusable & set(roles.values()):
            continue
        try:
            _lint_module(report, module, roles, config_ok)
            if base is not None:
                _lint_against_base(report, base, module, roles)
        except plugin.InputError as exc:  # a pattern that runs out of time on this module's name
            add("LORA020", exc.message, roles[next(iter(roles))])
            config_ok = False
    if config_ok:
        _lint_expert_coverage(report, base)
    if config_ok:
        try:
            differences = pattern_rule_differences(adapter.config, sorted(adapter.modules()))
        except plugin.InputError:
            differences = []
        if differences:
            more = f" (and {len(differences) - 1} more modules)" if len(differences) > 1 else ""
            add("LORA021", f"{differences[0]}{more}; the config does not record which peft saved it",
                field="rank_pattern")
    if check_values:
        for name in adapter.tensor_names():
            if name in unusable:
                continue
            tensor = adapter.tensor(name)
            bad = plugin.count_nonfinite(tensor)
            if bad:
                add("LORA011", f"{bad} NaN/Inf value(s)", name)
            elif name.endswith((".lora_B", ".lora_embedding_B")) and tensor.numel() and not bool(tensor.any()):
                add("LORA012", "lora_B is all zero", name)
                report.inert.add(plugin.split_name(name)[0])
    if config_ok:
        _lint_effect(report, check_values)
    return report.findings


def _lint_effect(report: Lint, check_values: bool) -> None:
    """LORA023: no module changes anything, because every lora_B is zero (an initial checkpoint published
    instead of the trained one) or every module's scaling is zero (``lora_alpha: 0``). Full tensors, trainable
    tokens, biases and DoRA magnitudes change the model whatever the factors hold."""
    modules = report.adapter.modules()
    if any(role.startswith("replace_") or role in ("trainable_tokens", "lora_bias", "lora_magnitude")
           for roles in modules.values() for role in roles):
        return
    factored = {m for m, roles in modules.items() if "lora_B" in roles or "lora_embedding_B" in roles}
    scales = report.adapter.config.get("modules")
    scaled = {m: info.get("scaling") for m, info in scales.items() if isinstance(info, dict)} \
        if isinstance(scales, dict) else {}
    if factored and all(scaled.get(m) == 0 for m in factored):
        report.add("LORA023", f"the scaling of all {len(factored)} adapted modules is 0 (lora_alpha "
                   f"{report.adapter.config.get('lora_alpha')!r})", field="lora_alpha",
                   fix="set lora_alpha (and alpha_pattern) to what the adapter was trained with")
    elif check_values:
        report.no_effect(factored)


def _lint_config(report: Lint) -> bool:
    """Config-only rules; False when a field is unusable, so that rules needing it are skipped."""
    config, add = report.adapter.config, report.add
    problems = config_problems(config)
    for field, message, rule in problems:
        add(rule, message, field=field.split("[")[0])
    if problems:
        return False
    modules = config.get("modules")
    for module, info in (modules if isinstance(modules, dict) else {}).items():
        scaling = info.get("scaling") if isinstance(info, dict) else None
        if isinstance(scaling, (int, float)) and not 1 / 64 <= scaling <= 16:
            add("LORA013", f"module {module} has scaling {info['scaling']:g} (alpha {info['alpha']}, rank "
                f"{info['rank']}{', rsLoRA' if config.get('use_rslora') else ''})", field="lora_alpha")
            break
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_MUTATING_INITS):
        add("LORA014", f"init_lora_weights is {init!r}", field="init_lora_weights")
    return True


def _lint_module(report: Lint, module: str, roles: dict[str, str], config_ok: bool = True) -> None:
    adapter, add = report.adapter, report.add
    config = adapter.config
    for a_role, b_role in (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B")):
        if (a_role in roles) != (b_role in roles):
            present, absent = (a_role, b_role) if a_role in roles else (b_role, a_role)
            add("LORA004", f"{present} has no matching {absent} for module {module}", roles[present])
            continue
        if a_role not in roles:
            continue
        a, b = adapter.info(roles[a_role]).shape, adapter.info(roles[b_role]).shape
        if a_role == "lora_A" and enabled_blocks(config) and config_ok:
            problem = merged_shapes_problem(config, tuple(a), tuple(b))  # peft 0.2.0 (legacy.py)
            if problem:
                add("LORA005", problem, roles[b_role], fix="ship the adapter_config.json of these weights")
            continue
        if len(a) < 2 or len(b) < 2 or a[0] != b[1]:
            add("LORA005", f"{a_role} {list(a)} and {b_role} {list(b)} do not share a rank", roles[a_role])
            continue
        if not config_ok:
            continue
        expert = (config.get("modules") or {}).get(module)
        if a_role == "lora_A" and isinstance(expert, dict) and expert.get("kind") == "experts":
            _lint_expert(report, module, expert, roles)
            continue
        rank, _ = lora_rank_alpha(config, module)
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
    if "trainable_tokens" in roles and config_ok:
        indices = token_indices(config, module) or []
        rows = adapter.info(roles["trainable_tokens"]).shape[0]
        if rows != len(indices):
            add("LORA010", f"{rows} trainable token rows but {len(indices)} indices in the config",
                roles["trainable_tokens"], field="trainable_token_indices")
    listed = config.get("modules_to_save")
    saved = listed if isinstance(listed, list) else []
    bias_mode = config.get("bias", "none")
    for role, name in roles.items():
        if not role.startswith("replace_"):
            continue
        explained = (has_factors or any(module.endswith(m) for m in saved)
                     or (role == "replace_bias" and bias_mode in ("all", "lora_only")))
        if not explained:
            add("LORA015", f"full {role[len('replace_'):]} of {module} saved, but the config does not say why",
                name, field="modules_to_save")


def _lint_expert(report: Lint, module: str, info: dict[str, object], roles: dict[str, str]) -> None:
    """A ParamWrapper level without the base: its parameter must be known, and ``lora_A``'s rows a whole
    number of experts at the config's rank (docs/peft.md, "LoRA on fused MoE experts")."""
    a_name = roles["lora_A"]
    if not info.get("parameter"):
        owner, _ = unwrapped(module)
        report.add("LORA024", f"cannot tell which of target_parameters "
                   f"{candidates(report.adapter.config, owner)} {module} adapts", a_name,
                   field="target_parameters")
    elif info.get("experts") is None and isinstance(info.get("rank"), int):
        rows = report.adapter.info(a_name).shape[0]
        report.add("LORA006", f"{info['parameter']}: lora_A has {rows} rows, not a whole number of experts at "
                   f"rank {info['rank']} (r / rank_pattern)", a_name, field="r")


DROPPED = "save the adapter again from the trained model with PEFT (some trainers drop expert factors on saving)"


def _lint_expert_coverage(report: Lint, base: BaseInfo | None) -> None:
    """LORA024 for expert deltas that were never saved: ``target_parameters`` set but no expert factors in the
    file (a trainer that dropped them), or, against a base holding fused experts, a targeted parameter of the
    base that no factors adapt (PEFT wraps every parameter the names match)."""
    adapter = report.adapter
    entries = targets(adapter.config)
    if not entries:
        return
    levels = {m: info for m, info in (adapter.config.get("modules") or {}).items()
              if isinstance(info, dict) and info.get("kind") == "experts"}
    if not levels:
        report.add("LORA024", f"target_parameters {entries} but the file holds no expert factors: the expert "
                   "deltas were not saved", field="target_parameters", fix=DROPPED)
        return
    if base is None:
        return
    reached = set()
    for info in levels.values():
        owner, _, param = str(info.get("parameter") or "").rpartition(".")
        found = base.locate(owner, param) if owner else None
        if found is not None:
            reached.add(found)
    missing = sorted(name for name, tensor in base.tensors.items() if len(tensor.shape) == 3 and name not in reached
                     and any(name == e or name.endswith("." + e) for e in entries))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        report.add("LORA024", f"the base's {missing[0]}{more} matches target_parameters but the file has no "
                   "factors for it: those expert deltas were not saved", field="target_parameters", fix=DROPPED)


def _lint_against_base(report: Lint, base: BaseInfo, module: str, roles: dict[str, str]) -> None:
    """Checks that need the base's config and safetensors headers (never its weights)."""
    adapter, add = report.adapter, report.add
    info = (adapter.config.get("modules") or {}).get(module)
    if isinstance(info, dict) and info.get("kind") == "experts":
        if "lora_A" in roles and "lora_B" in roles and info.get("parameter") and info.get("experts"):
            reached = reach(adapter, base, module, roles)
            if isinstance(reached, str):
                add("LORA024", f"{info['parameter']}: {reached}", roles["lora_A"])
        return
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
    if "lora_A" in roles and enabled_blocks(adapter.config) and len(b) == 3:  # peft 0.2.0 enable_lora
        b = (merged_out_features(adapter.config, tuple(b)), a[0])
    fits = {(b[0], a[1]), (a[1], b[0])} if "lora_A" in roles else {(a[1], b[0])}
    if len(a) == 2 and len(b) == 2 and w not in fits:
        add("LORA017", f"LoRA factors {list(a)} x {list(b)} do not fit base {target} {list(w)}", a_name)
