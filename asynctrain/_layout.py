"""Importing the package from a checkout, without installing it.

pyproject.toml installs `kernels/` and `models/` as ``asynctrain.kernels`` and
``asynctrain.models`` (``package_dir``), so with only the checkout on ``sys.path``
(``PYTHONPATH=.``, ``python -m pytest`` from the root, a benchmark that inserts the
root) ``import asynctrain`` works but its two subpackages would not be found: they
sit beside ``asynctrain/``, not in it. `install` adds a finder for exactly those two
names, pointing at the checkout's folders, when ``asynctrain`` itself is imported
from a checkout. An installed copy (the subpackages inside the package folder) is
left alone. This is what lets benchmarks/gpu_check.sh run with a bare ``python3``
that has torch and triton but cannot reach a package registry.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_ROOT = _PACKAGE.parent
SUBPACKAGES = {"asynctrain.kernels": _ROOT / "kernels", "asynctrain.models": _ROOT / "models"}


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds ``asynctrain.kernels`` / ``asynctrain.models`` in the checkout's folders."""

    def find_spec(self, fullname, path=None, target=None):
        folder = SUBPACKAGES.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def from_checkout() -> bool:
    """True when this ``asynctrain`` is a checkout's folder (its subpackages beside it)."""
    return not (_PACKAGE / "kernels").is_dir() and all((f / "__init__.py").is_file()
                                                      for f in SUBPACKAGES.values())


def install() -> None:
    # First in sys.meta_path: an editable install of another checkout must not supply
    # the subpackages of this one.
    if from_checkout() and not any(isinstance(f, _CheckoutFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _CheckoutFinder())
