"""The package's layering, read from the source: which packages may import which.

Each rule is (importing package, forbidden package, why). A module's imports are read with
``ast`` (top level and inside functions alike), so a lazy import counts too. Add a rule by
adding a line to ``FORBIDDEN``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = [
    ("harness.ops", "harness.models", "operators sit below the models that use them"),
    ("harness.profile", "harness.bench", "one measurement path: the benchmark scripts use profile, not the reverse"),
    ("harness.runner", "harness.bench", "runs measure through harness.profile; bench holds scripts only"),
]


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; relative imports resolved against its package)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def modules_of(package: str) -> list[Path]:
    """The files of a package (its folder, recursively) or of a single module."""
    path = ROOT / Path(*package.split("."))
    module = path.with_suffix(".py")
    return [module] if module.is_file() else sorted(path.rglob("*.py"))


@pytest.mark.parametrize("importer, forbidden, why", FORBIDDEN)
def test_no_forbidden_imports(importer, forbidden, why):
    files = modules_of(importer)
    assert files, f"no modules found under {importer}"
    offenders = {}
    for f in files:
        names = sorted(n for n in imported_modules(f) if n == forbidden or n.startswith(forbidden + "."))
        if names:
            offenders[str(f.relative_to(ROOT))] = names
    assert not offenders, f"{importer} must not import {forbidden} ({why}): {offenders}"


def test_the_rule_reader_sees_imports():
    """The reader itself: it finds an ops -> models import when one is written."""
    sample = ROOT / "harness" / "models" / "eamamba.py"
    assert "harness.ops.route_scan" in imported_modules(sample)
