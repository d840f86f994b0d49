"""What the package declares agrees with what it does: its version, its dependencies, its
platform. (scripts/check_package.sh builds and installs it; these checks need no build.)"""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

import trio_imappool

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))

# Import names of the distributions we declare, where they differ.
IMPORT_NAMES = {"trio-util": "trio_util", "imapclient": "imapclient"}


def _requirement_names(requirements: list[str]) -> set[str]:
    names = set()
    for requirement in requirements:
        name = requirement.split(";")[0]
        for separator in "<>=!~[ ":
            name = name.split(separator)[0]
        names.add(IMPORT_NAMES.get(name.lower(), name.lower().replace("-", "_")))
    return names


def _third_party_imports(paths: list[Path]) -> dict[str, set[str]]:
    """Top-level modules imported anywhere in these files (at any depth, lazily or not),
    outside the standard library and the project itself: module -> files."""
    found: dict[str, set[str]] = {}
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top.startswith(("trio_imappool", "_trio_")):
                    continue
                found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_the_version_is_written_once() -> None:
    assert PYPROJECT["project"]["dynamic"] == ["version"]
    assert "version" not in PYPROJECT["project"]
    assert importlib.metadata.version("trio-imappool") == trio_imappool.__version__
    written = [
        path.relative_to(ROOT)
        for path in (ROOT / "trio_imappool").rglob("*.py")
        if f'"{trio_imappool.__version__}"' in path.read_text(encoding="utf-8")
    ]
    assert written == [Path("trio_imappool/_version.py")]


def test_every_import_of_the_library_is_a_declared_dependency() -> None:
    project = PYPROJECT["project"]
    required = _requirement_names(project["dependencies"])
    extras = project["optional-dependencies"]
    # Modules imported by the library proper must be required; a few are imported only on
    # demand and belong to an extra (or, pytest, to the user's own test run).
    on_demand = {
        "trustme": "testing",
        "tqdm": "cli",
        "redis": "redis",  # RedisBudget imports it when one is made
        "pytest": None,  # the plugin, loaded by pytest itself
    }
    sources = sorted((ROOT / "trio_imappool").rglob("*.py"))
    sources.append(ROOT / "_trio_imappool_pytest_plugin.py")
    undeclared = {}
    for module, files in _third_party_imports(sources).items():
        if module in required:
            continue
        if module in on_demand:
            extra = on_demand[module]
            if extra is not None:
                assert module in _requirement_names(extras[extra]), (module, extra)
            continue
        undeclared[module] = sorted(files)
    assert undeclared == {}
    assert "outcome" in required


def test_imapclient_has_an_upper_bound_and_the_oldest_versions_are_the_lower_bounds() -> None:
    dependencies = {
        _requirement_names([requirement]).pop(): requirement
        for requirement in PYPROJECT["project"]["dependencies"]
    }
    assert "<" in dependencies["imapclient"]
    pins = {}
    for line in (ROOT / "scripts" / "oldest-constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[_requirement_names([name]).pop()] = version
    assert set(pins) == set(dependencies)
    for module, requirement in dependencies.items():
        lower = requirement.split(">=")[1].split(",")[0]
        assert pins[module].startswith(lower), (module, requirement, pins[module])


def test_importing_off_posix_says_the_package_is_posix_only() -> None:
    code = "import os\nos.name = 'nt'\nimport trio_imappool\n"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 1
    assert "ImportError: trio-imappool runs on POSIX systems only" in result.stderr
