"""What a code path imports, read from its source (ast), for the tests that hold the requirement locks to the code:
the first-party modules reachable from some roots and the third-party top-level names they import. Function-level
imports count (backends and GPU paths import lazily), and so do literal names passed to `find_spec` /
`import_module` (packages a library imports for us, checked for before use)."""
from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from conftest import ROOT

FIRST_PARTY = {p.rstrip("*") for p in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
               ["packages"]["find"]["include"]}
DYNAMIC_IMPORTS = {"find_spec", "import_module", "__import__"}


def lock_pins(path: Path) -> dict[str, str]:
    """{name: version} of a requirements file of `name==version` lines."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "-")):
            name, _, version = line.partition("==")
            pins[name] = version
    return pins


def first_party_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _imported_names(tree: ast.AST, package: str) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            names += [stem] + [f"{stem}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if func in DYNAMIC_IMPORTS:
                names.append(node.args[0].value)
    return names


def third_party_imports(roots: list[str | Path]) -> tuple[set[str], set[str]]:
    """(first-party modules, third-party top-level names) reachable from `roots`: module names (`serving.service`)
    or script files (`benchmarks/bench_train.py`)."""
    seen: set[str] = set()
    third: set[str] = set()
    todo = list(roots)
    while todo:
        root = todo.pop()
        if isinstance(root, Path):
            mod, path, package = str(root), root, ""
        else:
            mod, path = root, first_party_file(root)
            if path is None:
                continue
            package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        if mod in seen:
            continue
        seen.add(mod)
        for name in _imported_names(ast.parse(path.read_text()), package):
            top = name.split(".")[0]
            sibling = path.parent / f"{top}.py"  # a script's neighbour on its sys.path (benchmarks/bench_train.py)
            if top in FIRST_PARTY:
                todo.append(name)
            elif isinstance(root, Path) and sibling.is_file():
                todo.append(sibling)
            elif top and top != "__future__" and top not in sys.stdlib_module_names:
                third.add(top)
    return seen, third


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def unpinned(third: set[str], pins: set[str], known: dict[str, str] | None = None) -> dict[str, list[str] | str]:
    """Third-party import names whose distribution is not among `pins` (canonical names): {import: its
    distributions, or 'not installed' when neither this environment nor `known` (import -> distribution) says}."""
    dists = metadata.packages_distributions()
    missing: dict[str, list[str] | str] = {}
    for top in sorted(third):
        names = {canonical(d) for d in dists.get(top, [])} | ({canonical(known[top])} if top in (known or {}) else set())
        if not names & pins:
            missing[top] = sorted(names) or "not installed"
    return missing
