"""The README stays true: its commands exist, and CI runs its test command."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from click.testing import CliRunner

from adaptools.cli import get_cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def marked_command(marker: str) -> str:
    match = re.search(rf"<!-- {marker} -->\n```bash\n(.+)\n```", README)
    assert match, marker
    return match.group(1)


def test_ci_extracts_the_readme_test_command():
    script = (ROOT / ".ci" / "run").read_text()
    assert "test-command" in script
    out = subprocess.run(["awk", '/<!-- test-command -->/{found=1; next} found && /^```bash/{getline; print; exit}',
                          str(ROOT / "README.md")], capture_output=True, text=True).stdout.strip()
    assert out == marked_command("test-command")
    assert "pytest" in out and "torch==2.13.0" in out


def test_every_readme_command_exists():
    cli = get_cli()
    for name in re.findall(r"`adaptools ([a-z-]+)", README):
        assert name in cli.commands, name


def test_demo_command_runs_the_main_job():
    demo = marked_command("demo-command")
    assert "adaptools merge fixtures/bases/llama fixtures/adapters/llama-lora" in demo
    result = CliRunner().invoke(get_cli(), ["merge", "--help"])
    assert result.exit_code == 0


def test_library_example_runs_on_the_fixtures(tmp_path, monkeypatch):
    """The README's library section, run as written on the fixtures, using only the public `adaptools` API."""
    import shutil

    block = re.search(r"## Library\n\n```python\n(.+?)\n```", README, re.S)
    assert block, "README has no library example"
    code = block.group(1)
    assert re.findall(r"^(?:import|from) .+$", code, re.M) == ["import adaptools"]
    import adaptools

    used = set(re.findall(r"adaptools\.(\w+)", code))
    assert used <= set(adaptools.__all__), used - set(adaptools.__all__)
    shutil.copytree(ROOT / "fixtures" / "adapters" / "llama-lora", tmp_path / "my-lora")
    shutil.copytree(ROOT / "fixtures" / "bases" / "llama", tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "merged" / "config.json").is_file()
    assert (tmp_path / "my-lora.safetensors").is_file()
    assert namespace["report"].findings is not None and namespace["summary"].output
