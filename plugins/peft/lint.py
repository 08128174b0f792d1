"""The lint rules every PEFT method checks the same way, and the collector of one adapter's findings.

A config field of the wrong type, a tensor role the method does not know, NaN or Inf, a module the base
lacks: the same defect should read the same, with the same fix, whichever method's adapter has it. So the
rules are one table here (:data:`COMMON`, by kind), and each method builds its numbered table from it
(:func:`rule_table`) plus its own rules. The numbers stay each method's own: rule ids are public
(``adaptools check`` output, SARIF, the ``--fail-on`` of CI jobs).

:class:`Lint` collects the findings and runs the checks behind the common rules. A finding about the
config as a whole (a field, no tensor) points at the file that holds it: a PEFT folder's
``adapter_config.json``, else the adapter itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptools.plugin import Adapter, BaseInfo, BaseTensor, Finding, count_nonfinite

from .config_schema import config_problems
from .matching import is_targeted


@dataclass(frozen=True)
class Rule:
    """A lint rule: its severity, its one-line title and the fix ``adaptools check`` prints."""

    severity: str
    title: str
    fix: str


#: The rules every PEFT method checks the same way, by kind. Titles and fixes are templates: ``{method}``
#: is the method's display name, ``{config}`` its PEFT config class, ``{zero}`` what an all-zero tensor of
#: the method means.
COMMON = {
    "type": Rule("error", "config field has the wrong type",
                 "fix the field in adapter_config.json (see PEFT's {config})"),
    "role": Rule("error", "tensor role unknown to {method}",
                 "remove the tensor, or install the plugin of the method that uses it"),
    "dtype": Rule("error", "tensor dtype is not floating point", "save the adapter in fp32, fp16 or bf16"),
    "target": Rule("error", "weights on a module target_modules does not select",
                   "add the module to target_modules or drop its tensors"),
    "values": Rule("error", "NaN or Inf values",
                   "the adapter diverged in training or the file is corrupt: retrain or re-save"),
    "zero": Rule("warning", "{zero}", "publish the trained checkpoint, not the initial one"),
    "inert": Rule("error", "no module changes anything: the adapter has no effect",
                  "publish the trained checkpoint, not the initial one"),
    "missing": Rule("error", "target module missing from the base",
                    "use the base the adapter was trained on (base_model_name_or_path)"),
    "fit": Rule("error", "shape does not fit the base", "use the base the adapter was trained on (model size)"),
}


#: Fixes that rules of several methods share, word for word.
INCOMPLETE = "the adapter file is incomplete: save it again"
CORRUPT = "the adapter file is corrupt: save it again"
FOREIGN_CONFIG = "the config does not belong to these weights: ship the matching adapter_config.json"


@dataclass(frozen=True)
class RuleTable:
    """One method's rules: ``rules`` (id -> (severity, title), its ``AdapterMethod.rules``), their fixes, and
    ``ids``, the id it gives each common kind it checks."""

    rules: dict[str, tuple[str, str]]
    fixes: dict[str, str]
    ids: dict[str, str]


def rule_table(prefix: str, numbered: Mapping[int, str | Rule], *, method: str, config: str,
               zero: str = "") -> RuleTable:
    """A method's rule table: each number (``prefix`` + three digits) names a common kind or holds the
    method's own :class:`Rule`. ``method`` and ``config`` fill the common templates; ``zero`` is the title of
    the kind ``zero`` (what a tensor of zeros means for this method)."""
    rules, fixes, ids = {}, {}, {}
    for number, entry in sorted(numbered.items()):
        rule_id = f"{prefix}{number:03d}"
        if isinstance(entry, str):
            ids[entry] = rule_id
            common = COMMON[entry]
            entry = Rule(common.severity, common.title.format(method=method, zero=zero),
                         common.fix.format(config=config))
        rules[rule_id] = (entry.severity, entry.title)
        fixes[rule_id] = entry.fix
    return RuleTable(rules, fixes, ids)


def config_file(adapter: Adapter) -> str:
    """The file a config finding is about: a PEFT directory's adapter_config.json, else the adapter."""
    folder = Path(adapter.source)
    if adapter.read_format == "peft" and (folder / "adapter_config.json").is_file():
        return str(folder / "adapter_config.json")
    return adapter.source


class Lint:
    """Collects one adapter's findings for a method's rule table, with the checks of the common rules."""

    def __init__(self, adapter: Adapter, table: RuleTable):
        self.adapter, self.table = adapter, table
        self.findings: list[Finding] = []
        #: Modules found to change nothing (:meth:`zero`), for :meth:`no_effect`.
        self.inert: set[str] = set()

    def add(self, rule: str, message: str, name: str | None = None, field: str | None = None,
            fix: str | None = None) -> None:
        """A finding of ``rule`` about tensor ``name``, else about config ``field``, else the adapter."""
        if name:
            where: Mapping[str, str | None] = self.adapter.where(name)
        else:
            where = {"path": config_file(self.adapter) if field else self.adapter.source, "tensor": None}
        self.findings.append(Finding(rule, self.table.rules[rule][0], message, fix or self.table.fixes[rule],
                                     where["path"], where["tensor"], field))

    def config(self, schema: Mapping[str, Any]) -> bool:
        """Each config field the method reads has the type and range ``schema`` gives it
        (:mod:`.config_schema`); False when one does not, so that the rules and the maths that read the
        config are not run on it (:meth:`unusable_config`)."""
        config = self.adapter.config
        problems = config_problems(config, schema)
        for field, message, regex in problems:
            if not regex and field in config:  # a whole field: named with its value as Python shows it
                expected = message.partition(", expected ")[2]
                message = f"{field} is {repr(config[field])[:60]}" + (f", expected {expected}" if expected else "")
            self.add(self.table.ids["type"], message, field=field.split("[")[0])
        return not problems

    def unusable_config(self, known: tuple[str, ...], check_values: bool) -> list[Finding]:
        """The findings of an adapter whose config is unusable: the config's, and what the tensors alone
        show (roles, dtypes, values)."""
        self.roles(known)
        if check_values:
            self.finite()
        return self.findings

    def roles(self, known: tuple[str, ...]) -> None:
        """Every tensor has a role the method knows (or ``replace_<param>``) and a floating-point dtype."""
        for name in self.adapter.tensor_names():
            role = name.rpartition(".")[2]
            if role not in known and not role.startswith("replace_"):
                self.add(self.table.ids["role"], f"unknown tensor role {role!r}", name,
                         fix=f"known roles: {', '.join(known)}, replace_<param>")
            elif not self.adapter.info(name).dtype.startswith(("F", "BF")):
                self.add(self.table.ids["dtype"], f"dtype {self.adapter.info(name).dtype} is not floating point",
                         name)

    def finite(self) -> None:
        """No NaN or Inf in any tensor (reads every tensor)."""
        for name in self.adapter.tensor_names():
            tensor = self.adapter.tensor(name)
            bad = count_nonfinite(tensor)
            if bad:
                self.add(self.table.ids["values"], f"{bad} NaN/Inf value(s)", name)

    def zero(self, module: str, role: str, name: str, *, rows: bool = False) -> None:
        """A finite tensor of zeros only: the module changes nothing. An empty tensor is passed over (with
        ``rows``, only one without rows: AdaLoRA's ``lora_E`` of a module pruned to rank 0)."""
        shape = self.adapter.info(name).shape
        if (shape[0] if rows else math.prod(shape)) == 0:
            return
        tensor = self.adapter.tensor(name)
        if bool(tensor.isfinite().all()) and not bool(tensor.any()):
            self.add(self.table.ids["zero"], f"{role} of {module} is all zero", name)
            self.inert.add(module)

    def zeros(self, role: str, *, rows: bool = False) -> None:
        """:meth:`zero` for every module's ``role`` tensor."""
        for module, roles in self.adapter.modules().items():
            if role in roles:
                self.zero(module, role, roles[role], rows=rows)

    def no_effect(self, adapted: set[str]) -> None:
        """An error when every adapted module changes nothing (one such module is a warning, by :meth:`zero`:
        an adapter may leave a layer alone; an adapter that leaves every layer alone was never trained, or
        is the initial checkpoint published by mistake)."""
        if adapted and adapted <= self.inert:
            self.add(self.table.ids["inert"], f"all {len(adapted)} adapted modules change nothing")

    def targeted(self, module: str, name: str) -> None:
        """target_modules (with exclude_modules and layers_to_transform) selects the module."""
        if self.adapter.config.get("target_modules") is not None and not is_targeted(self.adapter.config, module):
            self.add(self.table.ids["target"], f"module {module} has weights but target_modules does not select it",
                     name, field="target_modules")

    def base_tensor(self, base: BaseInfo, module: str, name: str, param: str = "weight") -> BaseTensor | None:
        """The base tensor ``module.param``, or a finding that the base lacks it."""
        target = base.locate(module, param)
        if target is None:
            self.add(self.table.ids["missing"], f"the base has no {module}.{param}", name)
            return None
        return base.find(target)
