"""``adaptools check``: lint an adapter before it is published, and report in text, JSON, SARIF or JUnit.

Rules come from two places: file-level rules here (pickles, missing provenance) and the method's own
``lint`` (tensors against config, values, and, given a base, every target against the base's config and
safetensors headers; the base's weights are never read). Each finding names its rule, severity, file,
tensor or config field, and a one-line fix.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import registry
from ..adapter_io import ADAPTER_FILE_PATTERNS, detect_format, load
from ..checkpoint import CONFIG_SCHEMA, Checkpoint
from ..errors import IncompatibleBaseError, InputError, printable
from ..interfaces import SEVERITIES, BaseInfo, BaseTensor, Finding, ReadOptions
from ..jsonio import read_json
from ..resolve import parse_hub_ref, resolve
from ..version import __version__

SARIF_LEVEL = {"error": "error", "warning": "warning", "info": "note"}


@dataclass
class CheckReport:
    adapter: str
    method: str | None
    findings: list[Finding] = field(default_factory=list)
    rules: dict[str, tuple[str, str]] = field(default_factory=dict)

    def at_or_above(self, severity: str) -> list[Finding]:
        limit = SEVERITIES.index(severity)
        return [f for f in self.findings if SEVERITIES.index(f.severity) <= limit]


def base_info(ref: str) -> BaseInfo:
    """A base's tensors from its config and safetensors headers only (for a hub base, nothing else fetched)."""
    path = Path(ref).expanduser()
    if path.exists() or parse_hub_ref(ref) is None:
        return Checkpoint.open(ref).base_info()
    repo, revision = parse_hub_ref(ref)  # type: ignore[misc]
    try:
        from huggingface_hub import get_safetensors_metadata, hf_hub_download

        config_path = Path(hf_hub_download(repo, "config.json", revision=revision))
        meta = get_safetensors_metadata(repo, revision=revision)
    except Exception as exc:  # huggingface-hub raises many kinds; all mean "cannot read that base"
        raise InputError(f"cannot read the base's config and headers ({str(exc).splitlines()[0]})",
                         path=ref) from None
    config = read_json(config_path, what="config.json", schema=CONFIG_SCHEMA, hint="fix the base model's config.json")
    tensors = {}
    for file_meta in meta.files_metadata.values():
        for name, info in file_meta.tensors.items():
            tensors[name] = BaseTensor(name, info.dtype, tuple(info.shape))
    aliases = {}
    if config.get("tie_word_embeddings", True) and "lm_head.weight" not in tensors:
        embed = next((n for n in tensors if n.endswith("embed_tokens.weight")), None)
        if embed:
            aliases["lm_head.weight"] = embed
    return BaseInfo(tensors, config, aliases, ref)


def check(ref: str | os.PathLike[str], *, base: str | None = None, allow_pickle: bool = False) -> CheckReport:
    """Run every rule on one adapter. Raises InputError only when the adapter cannot be read at all."""
    path = resolve(ref, allow_patterns=ADAPTER_FILE_PATTERNS, what="adapter")
    if path.is_file() and path.name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        path = path.parent
    fmt = registry.get_format(detect_format(path))
    report = CheckReport(adapter=str(path), method=None, rules=dict(fmt.rules))
    options = ReadOptions(allow_pickle=allow_pickle, validate=False, base=base)
    # The format's own file-level rules first; an error there (weights it may not read) ends the check.
    report.findings.extend(fmt.lint(path, None, options))
    if any(f.severity == "error" for f in report.findings):
        return report
    adapter = load(path, allow_pickle=allow_pickle, validate=False, base=base)
    report.method = adapter.method
    report.findings.extend(fmt.lint(path, adapter, options))
    method = registry.get_method(adapter.method)
    report.rules.update(method.rules)
    report.findings.extend(method.lint(adapter, base_info(base) if base else None, check_values=True))
    return report


def to_json(reports: list[CheckReport]) -> dict[str, Any]:
    return {"tool": f"adaptools {__version__}", "adapters": [
        {"adapter": r.adapter, "method": r.method, "findings": [f.__dict__ for f in r.findings]} for r in reports]}


def to_sarif(reports: list[CheckReport]) -> dict[str, Any]:
    """SARIF 2.1.0, one run, the rules of every method involved, one result per finding."""
    rules: dict[str, tuple[str, str]] = {}
    for r in reports:
        rules.update(r.rules)
    results = []
    for r in reports:
        for f in r.findings:
            location: dict[str, Any] = {"physicalLocation": {"artifactLocation": {"uri": _uri(f.path or r.adapter)}}}
            if f.tensor or f.field:
                location["logicalLocations"] = [{"name": f.tensor or f.field, "kind": "member"}]
            results.append({"ruleId": f.rule, "level": SARIF_LEVEL[f.severity],
                            "message": {"text": f"{f.message}. Fix: {f.fix}"}, "locations": [location]})
    driver = {"name": "adaptools", "version": __version__, "informationUri": "https://pypi.org/project/adaptools/",
              "rules": [{"id": rule, "shortDescription": {"text": title},
                         "defaultConfiguration": {"level": SARIF_LEVEL[severity]}}
                        for rule, (severity, title) in sorted(rules.items())]}
    return {"$schema": "https://json.schemastore.org/sarif-2.1.0.json", "version": "2.1.0",
            "runs": [{"tool": {"driver": driver}, "results": results}]}


def to_junit(reports: list[CheckReport], fail_on: str) -> str:
    """JUnit XML: one test suite per adapter, one test case per rule; a rule fails when it has findings
    at or above ``fail_on``."""
    suites = ET.Element("testsuites", name="adaptools check")
    for r in reports:
        failing = r.at_or_above(fail_on)
        suite = ET.SubElement(suites, "testsuite", name=printable(r.adapter), tests=str(len(r.rules)),
                              failures=str(len({f.rule for f in failing})), errors="0")
        for rule, (severity, title) in sorted(r.rules.items()):
            case = ET.SubElement(suite, "testcase", classname=f"adaptools.{r.method or 'files'}",
                                 name=f"{rule} {title}")
            mine = [f for f in failing if f.rule == rule]
            if mine:  # names from files are escaped: XML cannot hold control characters at all
                failure = ET.SubElement(case, "failure", message=printable(mine[0].message), type=severity)
                failure.text = "\n".join(printable(f"{f.path}: {f.tensor or f.field or ''}: {f.message} (fix: {f.fix})")
                                         for f in mine)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True)


def _uri(path: str) -> str:
    try:
        return Path(path).resolve().relative_to(Path.cwd()).as_posix()
    except ValueError:
        return Path(path).resolve().as_uri()


def run_validators(ref: str, base: str, requests: tuple[Any, ...], *,
                   allow_pickle: bool = False) -> list[dict[str, Any]]:
    """``check --check NAME``: merge the adapter into ``base`` in a temporary folder, through the engine,
    so that each validator sees exactly what ``merge --check`` would publish (operation ``check``); return
    the verdicts. An adapter that does not fit the base at all (targets the base lacks) fails every check,
    with the reason: whatever loads it ignores it or refuses it."""
    import tempfile

    from ..engine import MergeInput, merge

    adapter = load(ref, allow_pickle=allow_pickle)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return merge(base, [MergeInput(adapter)], Path(tmp) / "merged", checks=requests, operation="check").checks
        except IncompatibleBaseError as exc:
            return [{"name": r.name, "passed": False, "message": f"the adapter does not apply to this base: {exc}",
                     "figures": {}} for r in requests]
