"""The layout rules of ARCHITECTURE.md that code can check: one dependency direction
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
    assert "_radix_threshold(" in (ROOT / "kernels" / "steps_forward.py").read_text()
    assert "_radix_threshold(" in (ROOT / "kernels" / "select_keyed.py").read_text()


def test_subpackages_come_from_the_checkout_beside_the_package():
    from asynctrain import kernels, models
    pkg = Path(asynctrain.__file__).resolve().parent
    if _layout.from_checkout():
        assert Path(kernels.__file__).resolve() == pkg.parent / "kernels" / "__init__.py"
        assert Path(models.__file__).resolve() == pkg.parent / "models" / "__init__.py"
    else:  # an installed copy: setuptools put them inside the package
        assert Path(kernels.__file__).resolve().parent.parent == pkg
