"""The README is a front door and docs/ holds the detail: the README stays short, and every relative link in it and
in docs/ points at a file that exists (and, with a #fragment, at a heading of that file). The tests stand alone: no
file in tests/ imports a test file (shared builders and fixtures are modules of their own), and nothing in bench/
imports from tests/. The suites that need open_flamingo or transformers carry the `comparison` marker, by which
the comparison environments select them."""

from __future__ import annotations

import ast
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


def python_files(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def dotted(node: ast.AST) -> str:
    """`a.b.c` for a Name / Attribute chain, else ''."""
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, top-level module name) of every absolute import at any depth (inside functions too), and of every
    importlib.import_module / __import__ call with a constant name."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
        elif (isinstance(node, ast.Call) and dotted(node.func).split(".")[-1] in ("import_module", "__import__")
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value.split(".")[0]))
    return found


def test_no_file_in_tests_imports_a_test_file():
    """A test file runs alone: what several need (builders.py, checkpoint_files.py, openflamingo_models.py, ...)
    is a module of its own, never another test file."""
    test_files = {p.stem for p in (ROOT / "tests").glob("test_*.py")}
    found = [f"{path.relative_to(ROOT)}:{line}: imports {name}" for path in python_files("tests")
             for line, name in imported_modules(ast.parse(path.read_text(encoding="utf-8")))
             if name in test_files and name != path.stem]
    assert not found, "\n".join(found)


def test_bench_imports_nothing_from_tests():
    """bench/ takes what it shares with the tests from flamingo_fast (flamingo_fast.testing): no import of a module
    of tests/, and no sys.path or PYTHONPATH entry that reaches into tests/."""
    bench_modules = {p.stem for p in python_files("bench")}
    test_modules = ({p.stem for p in python_files("tests")} - bench_modules) | {"tests"}
    path_calls = ("sys.path.insert", "sys.path.append", "sys.path.extend", "site.addsitedir")
    found = []
    for path in python_files("bench"):
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
        where = path.relative_to(ROOT)
        found += [f"{where}:{line}: imports {name}" for line, name in imported_modules(tree) if name in test_modules]
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and dotted(node.func) in path_calls and any(
                    isinstance(c, ast.Constant) and isinstance(c.value, str) and "tests" in c.value
                    for c in ast.walk(node)):
                found.append(f"{where}:{node.lineno}: {dotted(node.func)} into tests/")
        found += [f"{where}:{number}: {line.strip()[:80]}" for number, line in enumerate(text.splitlines(), 1)
                  if "PYTHONPATH" in line and "tests" in line]
    assert not found, "\n".join(found)


def test_files_that_need_the_comparison_packages_are_marked():
    """The comparison environments run `pytest -m comparison tests` (Makefile): a test file that skips without
    open_flamingo or transformers and lacks the marker would run nowhere."""
    needs = {"open_flamingo", "open_clip", "transformers"}
    unmarked = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        body = ast.parse(path.read_text(encoding="utf-8")).body
        skips = [node for node in body for call in ast.walk(node) if isinstance(call, ast.Call)
                 and dotted(call.func) == "pytest.importorskip" and call.args
                 and isinstance(call.args[0], ast.Constant) and call.args[0].value in needs]
        marks = [node for node in body if isinstance(node, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets)
                 and "pytest.mark.comparison" in ast.unparse(node.value)]
        if skips and not marks:
            unmarked.append(path.name)
    assert not unmarked, f"no module-level pytestmark = pytest.mark.comparison in {unmarked}"
