"""Warnings that point at the user's line, not at ours.

``warnings.warn(..., stacklevel=n)`` needs the depth of the call, which differs
between the paths into a check (``AsyncSNN(...)``, ``snn.configured(...)``, `fit`,
a recipe). `warn` walks the stack to the first frame outside this package, its
``kernels/`` and ``models/``, torch (``nn.Module.__call__`` sits between a user and
a module's ``forward``) and ``contextlib`` (``with snn.configured(...)``), and
attributes the warning there: Python's default filter then shows it once per
calling line, with the caller's file and line.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

import torch

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_FOLDERS = tuple(os.path.join(p, "") for p in (
    _PACKAGE, os.path.join(os.path.dirname(_PACKAGE), "kernels"),
    os.path.join(os.path.dirname(_PACKAGE), "models"), os.path.dirname(os.path.abspath(torch.__file__))))
_FILES = (os.path.abspath(contextlib.__file__),)


def _internal(filename: str) -> bool:
    path = os.path.abspath(filename)
    return path.startswith(_FOLDERS) or path in _FILES


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """`warnings.warn` attributed to the first caller outside the package."""
    frame, level = sys._getframe(1), 2  # level 2: the function that called warn
    while frame is not None and _internal(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
