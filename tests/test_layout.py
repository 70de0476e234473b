"""The layout rules that code can check: one dependency direction
(nothing under kernels/ imports from asynctrain), one radix search for both
selections, and the package importable from a checkout (asynctrain/_layout.py)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import asynctrain
from asynctrain import _layout

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append("." * node.level + (node.module or ""))
    return names


def test_kernels_never_import_asynctrain():
    bad = {p.name: [n for n in _imports(p) if n.split(".")[0] == "asynctrain" or n.startswith("..")]
           for p in sorted((ROOT / "kernels").glob("*.py"))}
    assert not any(bad.values()), {k: v for k, v in bad.items() if v}


def test_one_radix_search():
    # the radix round keeps the largest digit whose count reaches k: written once
    rounds = {p.name: len(re.findall(r"tl\.max\(tl\.where\(counts >= ", p.read_text()))
              for p in (ROOT / "kernels").glob("*.py")}
    assert {k: v for k, v in rounds.items() if v} == {"select.py": 1}
    assert "_radix_threshold(" in (ROOT / "kernels" / "steps_triton.py").read_text()


def test_subpackages_come_from_the_checkout_beside_the_package():
    from asynctrain import kernels, models
    pkg = Path(asynctrain.__file__).resolve().parent
    if _layout.from_checkout():
        assert Path(kernels.__file__).resolve() == pkg.parent / "kernels" / "__init__.py"
        assert Path(models.__file__).resolve() == pkg.parent / "models" / "__init__.py"
    else:  # an installed copy: setuptools put them inside the package
        assert Path(kernels.__file__).resolve().parent.parent == pkg


def test_every_test_named_slow_exists():
    """conftest.SLOW names tests by file; a renamed test must not silently leave it."""
    from conftest import SLOW

    for name, tests in SLOW.items():
        defined = {n.name for n in ast.walk(ast.parse((ROOT / "tests" / name).read_text()))
                   if isinstance(n, ast.FunctionDef)}
        assert set(tests) <= defined, (name, sorted(set(tests) - defined))


def test_no_import_circle_in_the_package():
    """Modules of asynctrain/ import each other in one direction (function-level imports
    included)."""
    mods = {p.stem: p for p in (ROOT / "asynctrain").glob("*.py")}
    edges = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        edges[name] = {d for d in deps if d in mods and d != name}

    def reaches(a, b, seen=()):
        return any(n == b or (n not in seen and reaches(n, b, (*seen, n))) for n in edges[a])

    circles = sorted({tuple(sorted((a, b))) for a in edges for b in edges[a] if reaches(b, a)})
    assert circles == [], circles
