"""The project's docs refer only to files the project has, and carry their own
description of the semantics (docs/semantics.md) with every open choice."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = {"table.md", "results.json", "summary.json"}  # files the runs write


def _paths(text: str) -> set[str]:
    found = set(re.findall(r"[`(\[]([\w./-]+\.(?:py|md|c|h|png|sh))[`)\]]", text))
    found |= set(re.findall(r"\b([\w-]+/[\w./-]+\.(?:py|md|c|h|png|sh))\b", text))
    return {p for p in found if p not in OUTPUTS and "<" not in p}


def _exists(p: str) -> bool:
    for base in (ROOT, ROOT / "asynctrain", ROOT / "tests", ROOT / "recipes", ROOT / "kernels"):
        if (base / p).exists():
            return True
    return False


def test_docs_refer_only_to_files_that_exist():
    texts = {"README.md": (ROOT / "README.md").read_text()}
    texts.update({str(p.relative_to(ROOT)): p.read_text() for p in (ROOT / "docs").glob("*.md")})
    texts["recipes/cifar_vgg7.py"] = (ROOT / "recipes" / "cifar_vgg7.py").read_text().split('"""')[1]
    missing = {name: sorted(p for p in _paths(t) if not _exists(p)) for name, t in texts.items()}
    assert not any(missing.values()), missing
    assert "SPEC.md" not in texts["README.md"] and "asynctrain/models/" not in texts["README.md"]


def test_semantics_covers_every_choice_the_readme_names():
    sem = (ROOT / "docs" / "semantics.md").read_text()
    for section in range(1, 12):
        assert f"\n## {section}. " in sem, section
    for topic in ("counter hash", "V <- V * (1 - s)", "removes a delivery entirely",
                  "`first_output_step`", "Synaptic operations", "fan-in is the number of sources",
                  "input_order", "fill_slots", "theta\n  1e9", "carry_pending"):
        assert topic in sem, topic


# Words that point at a document or a tracker the repository does not hold. PENDING
# would list files allowed to keep some for a while (none now); the test keeps such a
# list honest: a file that is clean must leave it.
GONE = re.compile(r"\bSTYLE \d|\bSTYLE point|\bSTYLE tolerance|ARCHITECTURE|DEVELOPERS\.md|SPEC\.md|"
                  r"\b[Ii]ssues? \d+|\b[Ii]ssue's|\b[Ii]ssue:|\bthe issue\b|\(issue\)|\bsession \d")
PENDING: set[str] = set()


def test_no_reference_to_documents_or_issues_outside_the_repository():
    files = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "Makefile",
             *ROOT.glob("docs/*.md"), *ROOT.glob("benchmarks/*.md"), *ROOT.glob("benchmarks/*.sh")]
    for folder in ("asynctrain", "kernels", "models", "recipes", "benchmarks", "tests"):
        files += sorted((ROOT / folder).glob("*.py"))
    found = {}
    for path in files:
        name = str(path.relative_to(ROOT))
        text = path.read_text()
        if name == "tests/test_docs.py":
            text = text.split("# Words that point at")[0]
        # a check that a name is absent is not a reference
        text = "\n".join(line for line in text.splitlines() if '" not in ' not in line)
        hits = sorted({m.group(0) for m in GONE.finditer(text)})
        if hits:
            found[name] = hits
    assert set(found) == PENDING, {k: v for k, v in found.items() if k not in PENDING} or \
        f"clean now, remove from PENDING: {sorted(PENDING - set(found))}"
