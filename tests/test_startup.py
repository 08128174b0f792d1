"""The console script's start-up (docs/merge-engine.md, "Start-up"): torch and the plugins load with the cyclic
garbage collector off, what they made is frozen, and the collector is on again before the command runs."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import gc, json, sys
import click
seen = {}
original = click.Group.main
def main(self, *args, **kwargs):  # the command's own run: what the collector looks like then
    seen.update(enabled=gc.isenabled(), frozen=gc.get_freeze_count(), torch="torch" in sys.modules)
    return original(self, *args, **kwargs)
click.Group.main = main
sys.argv = ["adaptools", "plugins"]
from adaptools.main import main as entry
try:
    entry()
except SystemExit as exc:
    seen["exit"] = exc.code
print("PROBE" + json.dumps(seen))
"""


def test_the_command_runs_with_the_collector_on_and_the_loaded_objects_frozen():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.split("PROBE", 1)[1])
    assert seen["enabled"] is True and seen["torch"] is True and seen.get("exit") in (None, 0)
    assert seen["frozen"] > 100_000  # torch's objects, no longer walked by each collection
