"""Running a test file's Triton tests under the interpreter, in a child process.

Triton decides compiled vs interpreted when it is first imported
(``TRITON_INTERPRET=1`` then), and by the time pytest reaches a kernel test file the
shared conftest has imported it compiled. `wrap_tests` wraps a file's tests so that
in a process whose kernels are interpreted they just run; otherwise the first such
test starts one child ``pytest`` on the file's selected wrapped tests with
``TRITON_INTERPRET=1`` set from the start (CPU tensors), and each test reports its
own outcome from the child's JUnit XML (failures with the child's message). Nothing
leaks into other test files; ``TRITON_INTERPRET=1 pytest <file>`` runs them
in-process. Used by test_kernels_triton.py, test_kernels_triton_conv.py,
test_kernels_triton_segments.py and test_steps_triton.py.
"""

from __future__ import annotations

import functools
import inspect
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

import pytest

_CHILD = "ASYNCTRAIN_TRITON_INTERPRETER_CHILD"


class _Child:
    def __init__(self, path: str, timeout_s: int):
        self.path, self.timeout_s = os.path.abspath(path), timeout_s
        self.outcomes: dict | None = None

    def run(self, session) -> dict:
        """{test name: (outcome, message)} of this file's wrapped tests, run once."""
        names = [item.name for item in session.items
                 if os.path.abspath(str(item.path)) == self.path and getattr(item.obj, "_in_interpreter", False)]
        xml = os.path.join(tempfile.mkdtemp(prefix="asynctrain-interp-"), "junit.xml")
        env = dict(os.environ, TRITON_INTERPRET="1", **{_CHILD: "1"})
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
               *[f"{self.path}::{n}" for n in names]]
        try:
            proc = subprocess.run(cmd, cwd=str(session.config.rootpath), env=env, capture_output=True,
                                  text=True, timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            return {"__error__": f"the interpreter child ran over {self.timeout_s} s"}
        outcomes = {}
        if os.path.exists(xml):
            for case in ET.parse(xml).getroot().iter("testcase"):
                outcome, message = "passed", ""
                for tag in ("failure", "error", "skipped"):
                    el = case.find(tag)
                    if el is not None:
                        outcome, message = tag, (el.text or el.get("message") or "")
                        break
                outcomes[case.get("name")] = (outcome, message)
        outcomes["__log__"] = f"child exit {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
        return outcomes

    def replay(self, request) -> None:
        if os.environ.get(_CHILD):
            pytest.fail("the interpreter child imported Triton compiled (TRITON_INTERPRET=1 had no effect)")
        if self.outcomes is None:
            self.outcomes = self.run(request.session)
        if "__error__" in self.outcomes:
            pytest.fail(self.outcomes["__error__"], pytrace=False)
        outcome, message = self.outcomes.get(request.node.name, ("missing", ""))
        if outcome == "skipped":
            pytest.skip(f"(in the interpreter child) {message}")
        if outcome != "passed":
            pytest.fail(f"{outcome} in the TRITON_INTERPRET=1 child process:\n{message}\n"
                        f"{self.outcomes['__log__'] if outcome == 'missing' else ''}", pytrace=False)


def _wrap(fn, child: _Child, interpreted: bool):
    """Run `fn` here if the kernels are interpreted, else report its child outcome."""
    sig = inspect.signature(fn)
    has_request = "request" in sig.parameters
    params = list(sig.parameters.values())
    if not has_request:
        params.append(inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY))

    @functools.wraps(fn)
    def run(*args, **kwargs):
        request = kwargs["request"] if has_request else kwargs.pop("request")
        if interpreted:
            return fn(*args, **kwargs)
        return child.replay(request)

    run.__signature__ = sig.replace(parameters=params)
    run._in_interpreter = True
    return run


def wrap_tests(namespace: dict, *, interpreted: bool, keep: tuple[str, ...] = (), timeout_s: int = 600) -> None:
    """Wrap every ``test_*`` function of a test module's `namespace` (its globals())
    but those whose names start with one of `keep` (e.g. ``test_cuda``: compiled)."""
    child = _Child(namespace["__file__"], timeout_s)
    for name, fn in list(namespace.items()):
        if name.startswith("test_") and callable(fn) and not (keep and name.startswith(keep)):
            namespace[name] = _wrap(fn, child, interpreted)
