"""What every quantized-base hostile-input suite (tests/test_*_inputs.py) does to a fixture checkpoint: copy it
with its tensors or its ``quantization_config`` edited, and check that a command on it ends in one clean line.

Each format's suite keeps its own cases (the corruptions that format invites); the way a case is made and
judged is the same for all, and lives here once.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

import adaptools


def edited(base: Path, tmp: Path, tensors: Callable[[dict], Any] | None = None,
           config: Callable[[dict], Any] | None = None) -> Path:
    """A copy of ``base`` with its tensors and/or its quantization_config edited."""
    out = tmp / "base"
    shutil.copytree(base, out)
    if tensors is not None:
        state = {k: v.clone() for k, v in load_file(str(out / "model.safetensors")).items()}
        tensors(state)
        (out / "model.safetensors").unlink()
        adaptools.plugin.save_tensors(out / "model.safetensors", state, {"format": "pt"})
    if config is not None:
        data = json.loads((out / "config.json").read_text())
        config(data["quantization_config"])
        (out / "config.json").write_text(json.dumps(data))
    return out


def put(name: str, value: Callable[[dict], Any]) -> Callable[[dict], Any]:
    return lambda s: s.update({name: value(s)})


def setitem(name: str, index: Any, value: Any) -> Callable[[dict], Any]:
    return lambda s: s[name].__setitem__(index, value)


def conf(**changes: Any) -> Callable[[dict], Any]:
    return lambda q: q.update(changes)


def refused_in_one_line(cli_runner: Callable[..., Any], path: Path, named: str, commands: Iterable[list[Any]],
                        out: Path) -> None:
    """Each command on ``path`` exits 2 with one stderr line naming the file and ``named``, no traceback, and
    leaves no output behind."""
    for command in commands:
        result = cli_runner(*command)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert str(path) in result.stderr and named in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()


def truncated_is_refused(cli_runner: Callable[..., Any], base: Path, tmp: Path) -> None:
    """The fixture with its shard cut 1000 bytes short: dequantize refuses it in one line naming the shard."""
    path = edited(base, tmp)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) - 1000])
    result = cli_runner("dequantize", path, tmp / "out")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert "model.safetensors" in result.stderr and not (tmp / "out").exists()
