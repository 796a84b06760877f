"""The import rules each package's docstring states, checked on the source."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

GUARD = Path(__file__).resolve().parents[2] / "guard"


def imports(path: Path) -> set[str]:
    """Every guard module a file imports, at any depth of the file (lazy imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("guard"):
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("guard")}
    return found


# The commands on top of the three sides.
ON_TOP = ("guard.cli", "guard.commands", "guard.entry", "guard.demo")


def modules(package: str) -> list[Path]:
    return sorted((GUARD / package).glob("*.py"))


@pytest.mark.parametrize(
    "package, forbidden",
    [
        ("policy", ("guard.kernel", "guard.observe", *ON_TOP)),
        ("kernel", ("guard.observe", *ON_TOP)),
        ("observe", ("guard.kernel.apply", *ON_TOP)),
    ],
)
def test_each_package_keeps_its_import_rule(package, forbidden):
    assert modules(package)
    for path in modules(package):
        wrong = {m for m in imports(path) if m.startswith(forbidden)}
        assert not wrong, f"{path.relative_to(GUARD.parent)} imports {sorted(wrong)}"


def test_only_the_binding_calls_libbpf():
    callers = [p for p in GUARD.rglob("*.py") if "libbpf.so" in p.read_text()]
    assert callers == [GUARD / "kernel" / "libbpf.py"]
    for path in GUARD.rglob("*.py"):
        if path.name != "libbpf.py":
            assert ".lib()" not in path.read_text(), path


def test_pyroute2_is_the_tests_oracle_and_nothing_else():
    """holders.py speaks sock_diag itself (pyroute2's import cost ~270 ms); pyroute2 only checks
    it, in tests/kernel/test_holders_oracle.py, and is no dependency of the package."""
    for path in GUARD.rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
        assert "pyroute2" not in names, path
    project = tomllib.loads((GUARD.parent / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.lower().startswith("pyroute2")]
