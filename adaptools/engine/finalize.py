"""What an engine run records beside the weights, always inside the temporary output before it is
renamed into place: provenance (in every shard's header), the shard index, config.json, the carried-over
files, a model card, and the verdicts of the checks that ran on the output.

Nothing here runs after the rename: a published output is complete with its verdicts, or absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint, index_name
from ..safetensors_io import read_header
from ..schema import Adapter
from ..version import __version__
from .entries import MergePlan
from .options import MergeInput

#: Where the checks' verdicts are written in the output folder.
CHECKS_FILE = "adaptools_checks.json"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def adapter_files(adapter: Adapter) -> list[Path]:
    src = Path(adapter.source)
    if not src.exists():  # built in memory
        return []
    if src.is_file():
        return [src]
    return sorted(p for p in src.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".bin"))


def _hub_sha256(path: Path) -> str | None:
    """A hub cache snapshot file is a link to ``blobs/<sha256>`` for LFS files: the hash comes for free."""
    if path.is_symlink():
        target = os.path.basename(os.readlink(path))
        if len(target) == 64 and all(c in "0123456789abcdef" for c in target):
            return target
    return None


def provenance(checkpoint: Checkpoint, inputs: Sequence[MergeInput], command: str | None, hash_base: bool,
               operation: str) -> dict[str, Any]:
    """Tool, operation, command, and every input with its hash (base shards only with ``hash_base``)."""
    base_files = []
    for shard in checkpoint.shards:
        sha = _hub_sha256(shard.path) or (sha256(shard.path) if hash_base else None)
        base_files.append({"file": shard.name, "bytes": shard.path.stat().st_size, "sha256": sha})
    adapters = [{"source": item.adapter.source, "method": item.adapter.method, "weight": item.weight,
                 **({"removed": True} if item.invert else {}), "base": item.adapter.base.to_json(),
                 "files": [{"file": p.name, "sha256": sha256(p)} for p in adapter_files(item.adapter)]}
                for item in inputs]
    return {"tool": f"adaptools {__version__}", "operation": operation, "command": command,
            "base": {"path": str(checkpoint.path), "files": base_files}, "adapters": adapters}


def write_index(tmp: Path, plan: MergePlan) -> None:
    """The shard index, from the headers as written (a quantized group's size is known only now)."""
    if not plan.write_index:
        return
    weight_map: dict[str, str] = {}
    total = 0
    for shard in plan.shards:
        for name, info in read_header(tmp / shard.name).tensors.items():
            weight_map[name] = shard.name
            total += info.nbytes
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / index_name(plan.checkpoint.stem)).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def write_files(tmp: Path, plan: MergePlan, record: Mapping[str, Any]) -> None:
    """config.json, the carried-over files (tokenizer, generation config, ...) and the model card."""
    (tmp / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for path in plan.files:
        shutil.copyfile(path, tmp / path.name)
    _write_card(tmp, record)


def _write_card(tmp: Path, record: Mapping[str, Any]) -> None:
    base = record["base"]["path"]
    adapters = "\n".join(f"- `{a['source']}` ({a['method']}, weight {a['weight']}"
                         f"{', taken out' if a.get('removed') else ''})" for a in record["adapters"])
    verb = {"unmerge": "unmerging from", "swap": "swapping adapters in"}.get(record["operation"], "merging into")
    what = f"by {verb} `{base}`:\n\n{adapters}" if adapters else f"by {record['operation']} of `{base}`."
    title = {"swap": "Swapped", "check": "Checked"}.get(record["operation"], record["operation"].capitalize() + "d")
    text = (f"---\nbase_model: {base}\nlibrary_name: transformers\ntags:\n- adaptools\n- {record['operation']}\n"
            f"---\n\n# {title} model\n\nMade by {record['tool']} {what}\n\n"
            f"Command: `{record['command'] or '(library call)'}`\n\n"
            "The full provenance (input hashes) is in each .safetensors file's metadata under "
            "`adaptools.provenance`.\n")
    (tmp / "README.md").write_text(text, encoding="utf-8")


def record_checks(folder: Path, checks: list[dict[str, Any]]) -> None:
    """The verdicts beside the output (adaptools_checks.json), and a failure flagged in its model card."""
    (folder / CHECKS_FILE).write_text(json.dumps(checks, indent=2) + "\n", encoding="utf-8")
    failed = [c for c in checks if not c["passed"]]
    if failed and (folder / "README.md").exists():
        with open(folder / "README.md", "a", encoding="utf-8") as card:
            for c in failed:
                card.write(f"\n**CHECK FAILED: {c['name']}**: {c['message']}\n")
