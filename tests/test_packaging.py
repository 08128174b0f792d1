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
    plugins = ROOT / "plugins"
    modules = sorted(f"adaptools_plugins/{p.relative_to(plugins)}" for p in plugins.rglob("*.py"))
    assert len(modules) > 40 and "adaptools_plugins/lora/method.py" in modules
    assert [m for m in modules if m not in names] == []  # every family and module of plugins/ is shipped
    core = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "adaptools").rglob("*.py"))
    assert [m for m in core if m not in names] == []
    assert "adaptools/schema-v1.json" in names
    assert "adaptools/py.typed" in names
    assert any(n.startswith("adaptools_plugins/bitsandbytes/_nf4_kernels") and n.endswith(".so") for n in names)
    assert any(n.startswith("adaptools_plugins/fp8/_fp8_kernels") and n.endswith(".so") for n in names)
    assert any(n.startswith("adaptools_plugins/gguf/_gguf_kernels") and n.endswith(".so") for n in names)


def test_installed_wheel_loads_builtins_and_entry_point_plugin(fresh_env, tmp_path):
    env_dir, site, _ = fresh_env
    env = {k: v for k, v in os.environ.items() if k not in ("ADAPTOOLS_LOAD_PLUGINS", "PYTHONPATH")}
    where = run(env_dir / "bin" / "python", "-c",
                "import adaptools_plugins.lora as m, adaptools; print(m.__file__); print(adaptools.__file__)",
                env=env, cwd=tmp_path).stdout.split()
    assert all(path.startswith(str(site)) for path in where), where
    listing = json.loads(run(env_dir / "bin" / "adaptools", "plugins", "--json", env=env, cwd=tmp_path).stdout)
    by_name = {p["name"]: p for p in listing["plugins"]}
    assert by_name["adaptools_plugins.lora"]["methods"] == ["lora", "adalora", "vera"]
    assert by_name["scale"]["distribution"] == "adaptools-scale"
    assert listing["operations"]["scale"] == ["convert", "info"]
    info = run(env_dir / "bin" / "adaptools", "info", ROOT / "fixtures" / "adapters" / "llama-lora", env=env,
               cwd=tmp_path)
    assert "method: lora" in info.stdout


def _clean_copy(dest: Path) -> Path:
    """The tracked sources alone (a build/ folder from an earlier build would hide a compiler's absence)."""
    import shutil

    files = run("git", "ls-files", cwd=ROOT).stdout.split()
    for name in files:
        if name.startswith(("fixtures/", "tests/", "benchmarks/")):
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    return dest


def test_a_build_without_a_compiler_fails_loudly(tmp_path):
    source = _clean_copy(tmp_path / "src")
    env = {**os.environ, "CC": "/bin/false", "LDSHARED": "/bin/false"}
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                             str(tmp_path / "dist"), str(source)], capture_output=True, text=True, env=env)
    assert result.returncode != 0
    assert not list((tmp_path / "dist").glob("*.whl"))


def test_no_native_builds_a_pure_wheel_that_says_it_falls_back(tmp_path):
    env = {**os.environ, "ADAPTOOLS_NO_NATIVE": "1"}
    source = _clean_copy(tmp_path / "src")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", source,
        env=env)
    (wheel,) = (tmp_path / "dist").glob("adaptools-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl")
    import zipfile

    kernels = ("_nf4_kernels", "_fp8_kernels", "_gguf_kernels", "_packed_kernels")
    assert not any(k in n for k in kernels for n in zipfile.ZipFile(wheel).namelist())


@pytest.mark.parametrize("backend, native, variable, fallback", [
    ("nf4", "native kernel (", "ADAPTOOLS_NF4_PURE_TORCH", "torch fallback"),
    ("fp8", "native kernel (", "ADAPTOOLS_FP8_PURE_TORCH", "torch (no native kernel"),
    ("gguf", "native kernel (", "ADAPTOOLS_GGUF_PURE_PYTHON", "gguf-py (no native kernel"),
    ("awq", "native kernel (", "ADAPTOOLS_PACKED_PURE_TORCH", "torch (no native kernel"),
    ("gptq", "native kernel (", "ADAPTOOLS_PACKED_PURE_TORCH", "torch (no native kernel"),
    ("ct_pack", "native kernel (", "ADAPTOOLS_PACKED_PURE_TORCH", "torch (no native kernel"),
])
def test_plugins_says_which_code_runs(backend, native, variable, fallback):
    out = run(sys.executable, "-m", "adaptools", "plugins", "--json").stdout
    assert json.loads(out)["backends"][backend].startswith(native)
    out = run(sys.executable, "-m", "adaptools", "plugins", "--json", env={**os.environ, variable: "1"}).stdout
    assert json.loads(out)["backends"][backend].startswith(fallback)


def test_a_kernel_library_of_another_interface_version_is_not_used(tmp_path):
    import shutil

    from adaptools_plugins.bitsandbytes import nf4 as nf4

    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    src = tmp_path / "k.c"
    src.write_text("int adaptools_nf4_abi(void) { return 999; }\nint adaptools_nf4_isa(void) { return 0; }\n")
    run("cc", "-shared", "-fPIC", "-o", tmp_path / "_nf4_kernels.so", src)
    assert nf4._load_native(tmp_path) is None
    assert nf4._load_native() is not None
    from adaptools_plugins.fp8 import native

    src.write_text("int adaptools_fp8_abi(void) { return 999; }\nint adaptools_fp8_isa(void) { return 0; }\n")
    run("cc", "-shared", "-fPIC", "-o", tmp_path / "_fp8_kernels.so", src)
    assert native._load(tmp_path) is None
    assert native._load() is not None
    from adaptools_plugins.gguf import native as gguf_native

    # the library before the K-quant and Q4_0..Q5_1 codecs joined it (ABI 2 and 1) lacks their functions
    for old in (1, 2):
        (tmp_path / f"v{old}").mkdir()  # a folder each: dlopen would hand back a path it already loaded
        src.write_text(f"int adaptools_gguf_abi(void) {{ return {old}; }}\n"
                       "int adaptools_gguf_isa(void) { return 0; }\n")
        run("cc", "-shared", "-fPIC", "-o", tmp_path / f"v{old}" / "_gguf_kernels.so", src)
        assert gguf_native._load(tmp_path / f"v{old}") is None
    assert gguf_native._load() is not None
    from adaptools import packed

    (tmp_path / "packed").mkdir()
    src.write_text("int adaptools_packed_abi(void) { return 999; }\nint adaptools_packed_isa(void) { return 0; }\n")
    run("cc", "-shared", "-fPIC", "-o", tmp_path / "packed" / "_packed_kernels.so", src)
    assert packed._load(tmp_path / "packed") is None
    assert packed._load() is not None
