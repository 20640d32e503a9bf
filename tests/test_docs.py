"""The README is a front door and docs/ holds the detail: the README stays short, and every relative link in it and
in docs/ points at a file that exists (and, with a #fragment, at a heading of that file)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 150
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces to hyphens."""
    found = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return found


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; expected at most {README_MAX_LINES}"
    assert "make test" in "\n".join(lines[:8]) and "make profile" in "\n".join(lines[:8])


@pytest.mark.parametrize("doc", documents(), ids=lambda p: p.name)
def test_every_relative_link_resolves(doc: Path):
    broken = []
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        file, _, fragment = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            broken.append(f"{target} (no file {path})")
        elif fragment and path.suffix == ".md" and fragment not in anchors(path):
            broken.append(f"{target} (no heading #{fragment} in {path.name})")
    assert not broken, f"{doc.name}: broken links: {broken}"


def test_the_docs_the_readme_promises_exist():
    for name in ("api", "semantics", "dropins", "int8", "context_cache", "development"):
        assert (ROOT / "docs" / f"{name}.md").is_file(), name


def test_nothing_cites_an_issue_number_or_the_design_card():
    """A clone cannot look up an issue by its number, nor the design card kept outside the repository: code and docs
    say what the thing is, or link docs/."""
    cited = re.compile(r"\bissues? [0-9]|DESIGN" + r"\.md")
    found = []
    for folder in ("flamingo_fast", "kernels", "tests", "bench", "docs"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix not in (".py", ".md", ".sh") or "__pycache__" in path.parts:
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if cited.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:80]}")
    for number, line in enumerate((ROOT / "README.md").read_text(encoding="utf-8").splitlines(), 1):
        if cited.search(line):
            found.append(f"README.md:{number}: {line.strip()[:80]}")
    assert not found, "\n".join(found)
