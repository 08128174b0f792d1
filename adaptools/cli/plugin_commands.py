"""``adaptools plugins``: what is installed, and each method's operations."""

from __future__ import annotations

from typing import Any

import click

from .. import registry
from ..interfaces import OPERATIONS
from ..plugins import load_plugins, pm
from .group import cli, emit_json, json_option


@cli.command()
@json_option
def plugins(json_: bool) -> None:
    """List loaded plugins, what each provides, and the operations of each method."""
    load_plugins()
    rows: dict[str, dict[str, Any]] = {}
    kinds: dict[str, dict[str, registry.Registered[Any]]] = {
        "methods": registry.methods(), "formats": registry.formats(), "backends": registry.backends(),
        "validators": registry.validators()}
    for kind, entries in kinds.items():
        for name, entry in entries.items():
            row = rows.setdefault(entry.plugin, {"name": entry.plugin, "distribution": entry.distribution,
                                                 "version": entry.version, "methods": [], "formats": [],
                                                 "backends": [], "validators": []})
            row[kind].append(name)
            if kind == "backends":  # the output containers a backend offers (merge --to)
                row.setdefault("containers", []).extend(c.name for c in entry.obj.containers())
    for plugin in pm.get_plugins():
        name = pm.get_name(plugin) or repr(plugin)
        rows.setdefault(name, {"name": name, "distribution": None, "version": None, "methods": [],
                               "formats": [], "backends": [], "validators": []})
    implementations = {name: e.obj.implementation for name, e in kinds["backends"].items()}
    matrix = {name: sorted(e.obj.operations) for name, e in kinds["methods"].items()}
    conditional = {name: dict(e.obj.conditional) for name, e in kinds["methods"].items() if e.obj.conditional}
    if json_:
        emit_json({"plugins": list(rows.values()), "operations": matrix, "conditional": conditional,
                   "backends": implementations})
        return
    for row in rows.values():
        dist = f"{row['distribution']} {row['version'] or ''}".strip() if row["distribution"] else "-"
        provides = "; ".join(f"{k}: {', '.join(row[k])}" for k in ("methods", "formats", "backends", "containers",
                                                                    "validators") if row.get(k))
        click.echo(f"{row['name']}  ({dist})  {provides or 'commands only'}")
    click.echo("")
    click.echo("method".ljust(15) + "".join(op.ljust(9) for op in OPERATIONS))
    for name, ops in matrix.items():
        marks = ["some" if op in conditional.get(name, {}) else "yes" if op in ops else "-" for op in OPERATIONS]
        click.echo(name.ljust(15) + "".join(mark.ljust(9) for mark in marks))
    for name, whens in conditional.items():
        for op, when in whens.items():
            click.echo(f"  {name} {op}: {when}")
    click.echo("")
    for name, how in implementations.items():
        if how != "python":
            click.echo(f"backend {name}: {how}")
