"""The wheel carries the built-in plugins and they load; a third-party plugin installs through its entry point.

The wheel is installed into a fresh virtual environment that sees this environment's dependencies (torch,
safetensors, ...) through a .pth path entry, but not this checkout's editable adaptools.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args, **kw):
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", ROOT)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp / "dist",
        ROOT / "tests" / "example_plugin")
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheels = sorted((tmp / "dist").glob("*.whl"))
    run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", *wheels)
    return env_dir, site, wheels


def test_wheel_contains_builtin_plugins(fresh_env):
    import zipfile

    _, _, wheels = fresh_env
    wheel = next(w for w in wheels if w.name.startswith("adaptools-"))
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("lora", "peft_format", "schema_format", "dense", "nf4"):
        assert f"adaptools_plugins/{module}.py" in names
    assert "adaptools/schema-v1.json" in names
    assert "adaptools/py.typed" in names
    assert any(n.startswith("adaptools_plugins/_nf4_kernels") and n.endswith(".so") for n in names)


def test_installed_wheel_loads_builtins_and_entry_point_plugin(fresh_env, tmp_path):
    env_dir, site, _ = fresh_env
    env = {k: v for k, v in os.environ.items() if k not in ("ADAPTOOLS_LOAD_PLUGINS", "PYTHONPATH")}
    where = run(env_dir / "bin" / "python", "-c",
                "import adaptools_plugins.lora as m, adaptools; print(m.__file__); print(adaptools.__file__)",
                env=env, cwd=tmp_path).stdout.split()
    assert all(path.startswith(str(site)) for path in where), where
    listing = json.loads(run(env_dir / "bin" / "adaptools", "plugins", "--json", env=env, cwd=tmp_path).stdout)
    by_name = {p["name"]: p for p in listing["plugins"]}
    assert by_name["adaptools_plugins.lora"]["methods"] == ["lora"]
    assert by_name["scale"]["distribution"] == "adaptools-scale"
    assert listing["operations"]["scale"] == ["convert", "info"]
    info = run(env_dir / "bin" / "adaptools", "info", ROOT / "fixtures" / "adapters" / "llama-lora", env=env,
               cwd=tmp_path)
    assert "method: lora" in info.stdout
