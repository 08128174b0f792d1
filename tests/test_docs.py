"""The repository is self-contained: every citation in it points at a docs/ page and section that exist here.

A comment that says "see X" is only worth something if a maintainer can open X. So tracked sources, tests,
fixtures, benchmarks, examples, the README and docs/ itself may cite only ``docs/<page>.md``, by section
heading (the quoted text after the page name), never a document outside the repository and never a section
number (numbers move when a page grows).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEXT_SUFFIXES = {".py", ".c", ".h", ".cpp", ".md", ".toml", ".cfg", ".txt", ".yml", ".yaml", ".sh", ".json"}
SKIP_DIRS = (".git/", ".venv/", "build/", "dist/", "fixtures/cache/", "benchmarks/.work/")
#: This file holds bad citations on purpose, as test data.
SELF = "tests/test_docs.py"

#: A page of the research notes this project was built from, which live outside the repository.
OUTSIDE = [
    (re.compile(r"\bshared[/]"), "a path outside the repository"),
    (re.compile(r"\b[\w-]+-format(?:\.md|\s*\u00a7)"), "a format note outside the repository"),
]
#: A docs/ page named in running text or a link (not inside a longer path such as a URL).
PAGE = re.compile(r"(?<![\w/.-])docs/([\w.-]+?\.md)\b")
#: A citation by heading: the page, a comma, then the heading in double quotes (which may wrap lines).
CITATION = re.compile(r"(?<![\w/.-])docs/([\w.-]+?\.md),\s+\"([^\"]+)\"")
#: A citation by section number, of a docs/ page or of nothing named at all.
SECTION_SIGN = "\u00a7"


def tracked_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        names = out.splitlines()
    except (OSError, subprocess.CalledProcessError):
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()]
    return sorted(n for n in names
                  if (Path(n).suffix in TEXT_SUFFIXES or n == ".ci/run")
                  and not n.startswith(SKIP_DIRS) and n != SELF and (ROOT / n).is_file())


def read(name: str) -> str:
    return (ROOT / name).read_text(encoding="utf-8", errors="replace")


def normalise(text: str) -> str:
    """One line, single spaces: a heading quoted in a wrapped comment carries the comment's ``#``."""
    return " ".join(re.sub(r"\n\s*(?:#+|\*)?", " ", text).split())


def headings(page: str) -> set[str]:
    """The page's headings without their ``#`` marks and any leading section number (``3.``, ``3.2``)."""
    found = set()
    in_code = False
    for line in read(f"docs/{page}").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"#{1,6}\s+(.+?)\s*#*\s*$", line)):
            found.add(re.sub(r"^\d+(?:\.\d+)*\.?\s+", "", m.group(1)).strip())
    return found


def line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def problems(names: list[str]) -> list[str]:
    out = []
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    for name in names:
        text = read(name)
        for pattern, what in OUTSIDE:
            for m in pattern.finditer(text):
                out.append(f"{name}:{line_of(text, m.start())}: cites {what}: {m.group(0)!r}")
        for m in PAGE.finditer(text):
            if m.group(1) not in pages:
                out.append(f"{name}:{line_of(text, m.start())}: docs/{m.group(1)} does not exist")
        for m in CITATION.finditer(text):
            page, heading = m.group(1), normalise(m.group(2))
            if page in pages and heading not in headings(page):
                out.append(f"{name}:{line_of(text, m.start())}: docs/{page} has no heading {heading!r}")
        if not name.startswith("docs/"):
            for m in re.finditer(SECTION_SIGN, text):
                out.append(f"{name}:{line_of(text, m.start())}: cites a section by number; cite docs/ by heading")
    return out


def test_every_citation_is_to_a_page_and_heading_in_this_repository():
    names = tracked_files()
    assert "README.md" in names and any(n.startswith("docs/") for n in names)
    found = problems(names)
    assert not found, "\n".join(found)


@pytest.mark.parametrize("line, expected", [
    ("see /work/shared/docs/x.md", "outside"),
    ("(peft-format.md §3.2)", "outside"),
    ("(nf4-format §6.1)", "outside"),
    ("(docs/no-such-page.md)", "does not exist"),
    ('(docs/int8.md, "No such heading")', "no heading"),
    ("(docs/int8.md §3)", "by number"),
])
def test_each_kind_of_bad_citation_is_caught(tmp_path, monkeypatch, line, expected):
    """The check itself can fail: each kind of bad citation in a source file is reported."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "int8.md").write_text("# Title\n\n## 3. Quantization\n")
    (tmp_path / "mod.py").write_text(f'"""{line}"""\n')
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    found = problems(["mod.py"])
    assert found and expected in found[0], found
    (tmp_path / "mod.py").write_text('"""(docs/int8.md, "Quantization") and docs/int8.md"""\n')
    assert problems(["mod.py"]) == []
