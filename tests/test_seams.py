"""The package's modules reach each other through public names only: no module reads, calls or assigns a private
attribute (`_x`) that another module's classes define, or a private name of another module of the package."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "flamingo_fast"


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _modules(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def _trees() -> dict[str, ast.Module]:
    """Each module of the package by its path below flamingo_fast/, without `.py` (`runtime/prefill`)."""
    return {path.relative_to(PACKAGE).with_suffix("").as_posix(): ast.parse(path.read_text(), str(path))
            for path in _modules(PACKAGE)}


def _class_privates(tree: ast.Module) -> set[str]:
    """Private names a module's classes define: methods, class attributes, and `self._x = ...` in methods."""
    names = set()
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        for node in ast.walk(cls):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node in cls.body:
                names.add(node.name)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node in cls.body:
                names.add(node.target.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) \
                    and isinstance(node.value, ast.Name) and node.value.id == "self":
                names.add(node.attr)
    return {n for n in names if _private(n)}


SUBPACKAGES = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}


def _package_modules(tree: ast.Module) -> dict[str, str]:
    """Local names bound to a module of the package: `from . import masking`, `from .. import masking`,
    `from ..runtime import prefill`, `from flamingo_fast.runtime import prefill`."""
    out = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        module = node.module or ""
        if node.level == 0:
            package = module == "flamingo_fast" or module.removeprefix("flamingo_fast.") in SUBPACKAGES
        else:
            package = module == "" or module in SUBPACKAGES
        if package:
            out.update({a.asname or a.name: a.name for a in node.names})
    return out


def cross_module_private_access(trees: dict[str, ast.Module]) -> list[str]:
    privates = {name: _class_privates(tree) for name, tree in trees.items()}
    found = []
    for name, tree in trees.items():
        others = set().union(*(p for m, p in privates.items() if m != name)) - privates[name]
        modules = _package_modules(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not _private(node.attr):
                continue
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if node.attr in others or isinstance(owner, ast.Name) and owner.id in modules:
                found.append(f"{name}.py:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_reaches_into_another_modules_private_names():
    assert cross_module_private_access(_trees()) == []


def test_the_check_finds_a_private_call_across_modules():
    trees = {
        "runtime": ast.parse("class FastFlamingo:\n    def _check(self): pass\n    def run(self): self._check()\n"),
        "prefix_state": ast.parse("from . import prefill\ndef f(runtime):\n    runtime._check()\n"
                                  "    prefill._fill(runtime)\n"),
        "prefill": ast.parse("def _fill(x): pass\n"),
    }
    assert cross_module_private_access(trees) == ["prefix_state.py:3: runtime._check",
                                                  "prefix_state.py:4: prefill._fill"]


# Sizes a reader can hold: a module of the package (or kernels/) at most MAX_FILE_LINES lines, a class at most
# MAX_CLASS_LINES (from its `class` line to its last).
MAX_FILE_LINES, MAX_CLASS_LINES = 500, 250
KERNELS = PACKAGE.parent / "kernels"


def oversized(sources: dict[str, str]) -> list[str]:
    """Each file over MAX_FILE_LINES lines and each class over MAX_CLASS_LINES, with its size."""
    found = []
    for name, source in sources.items():
        lines = len(source.splitlines())
        if lines > MAX_FILE_LINES:
            found.append(f"{name}: {lines} lines (at most {MAX_FILE_LINES})")
        for node in ast.walk(ast.parse(source, name)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                found.append(f"{name}:{node.lineno}: class {node.name}: {node.end_lineno - node.lineno + 1} lines "
                             f"(at most {MAX_CLASS_LINES})")
    return found


def test_no_file_over_500_lines_and_no_class_over_250():
    root = PACKAGE.parent
    sources = {str(p.relative_to(root)): p.read_text() for folder in (PACKAGE, KERNELS) for p in _modules(folder)}
    assert any(name.startswith("kernels/") for name in sources) and "flamingo_fast/runtime/runtime.py" in sources
    assert oversized(sources) == []


def test_the_size_check_finds_a_long_file_and_a_long_class():
    long_class = "class Big:\n" + "    x = 1\n" * MAX_CLASS_LINES  # MAX_CLASS_LINES + 1 lines
    fits = "class Small:\n" + "    x = 1\n" * (MAX_CLASS_LINES - 1)
    long_file = "x = 1\n" * (MAX_FILE_LINES + 1)
    assert oversized({"a.py": long_class, "b.py": fits, "c.py": long_file}) == [
        f"a.py:1: class Big: {MAX_CLASS_LINES + 1} lines (at most {MAX_CLASS_LINES})",
        f"c.py: {MAX_FILE_LINES + 1} lines (at most {MAX_FILE_LINES})"]
