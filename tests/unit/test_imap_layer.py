"""The imaplib layer, trio_imappool/_imap/, stays a layer: no Trio in it, nothing of the pool.

Read from the source with :mod:`ast` (no fresh interpreter needed): every import of every module
of the layer, type-only and function-level imports included, must be the standard library, a
third-party package other than Trio's family, the layer itself, or one of the leaves that
import no Trio either (checked the same way). tests/unit/test_layering.py checks the package's
layers as a whole; this one is the layer's own, with the reason in each failure message.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

import trio_imappool

PACKAGE_DIR = Path(trio_imappool.__file__).parent
LAYER = "trio_imappool._imap"
#: Modules of the package the layer may import: leaves whose own imports are checked too.
LEAVES = frozenset({"trio_imappool._util", "trio_imappool._version", "trio_imappool._commands"})
#: Top-level packages that are Trio or run on it.
TRIO_FAMILY = frozenset({"trio", "trio_util", "outcome", "sniffio", "anyio", "pytest_trio"})


def module_path(module: str) -> Path | None:
    """The source file of a module of the package, or None if there is none."""
    relative = Path(*module.split(".")[1:])
    for candidate in (PACKAGE_DIR / relative / "__init__.py", PACKAGE_DIR / f"{relative}.py"):
        if candidate.is_file():
            return candidate
    return None


def imports_of(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module *source* (the text of *module*) imports, anywhere in it, by absolute
    name; ``from X import name`` counts ``X.name`` where that is a module of the package, else
    ``X``. (Python imports the parent packages too; the package's own ``__init__`` is not the
    layer's choice and is not counted.)"""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                if node.level - 1 >= len(parts):
                    found.add("." * node.level + (node.module or ""))  # leaves the package
                    continue
                base = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            for alias in node.names:
                name = f"{base}.{alias.name}"
                if name.startswith("trio_imappool.") and module_path(name) is not None:
                    found.add(name)  # a module: ``from . import _sockets``
                else:
                    found.add(base)  # a name of the module *base*
    return found


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """What is wrong with the imports of *module* (a module of the layer or a leaf)."""
    in_layer = module == LAYER or module.startswith(LAYER + ".")
    problems = []
    for name in sorted(imports_of(source, module, is_package)):
        top = name.split(".")[0]
        if top in TRIO_FAMILY:
            problems.append(f"{module} imports {name}: no Trio in the imaplib layer")
        elif not top:
            problems.append(f"{module} imports {name}, outside the package")
        elif top == "trio_imappool":
            allowed = name in LEAVES or (in_layer and (name == LAYER or name.startswith(LAYER)))
            if not allowed:
                problems.append(
                    f"{module} imports {name}: the imaplib layer imports only itself and the "
                    f"leaves without Trio ({', '.join(sorted(LEAVES))})"
                )
    return problems


def layer_modules() -> list[tuple[str, Path]]:
    modules = []
    for path in sorted((PACKAGE_DIR / "_imap").glob("*.py")):
        name = LAYER if path.name == "__init__.py" else f"{LAYER}.{path.stem}"
        modules.append((name, path))
    return modules


def test_the_layer_has_its_modules() -> None:
    names = {name for name, _ in layer_modules()}
    assert LAYER in names
    assert {f"{LAYER}._wire_client", f"{LAYER}._idle_wire", f"{LAYER}._sockets"} <= names


@pytest.mark.parametrize(("module", "path"), layer_modules(), ids=lambda v: str(v))
def test_no_module_of_the_layer_imports_trio_or_the_pool(module: str, path: Path) -> None:
    source = path.read_text(encoding="utf-8")
    assert violations(source, module, path.name == "__init__.py") == []


@pytest.mark.parametrize("leaf", sorted(LEAVES))
def test_the_leaves_the_layer_may_import_import_no_trio_either(leaf: str) -> None:
    path = module_path(leaf)
    assert path is not None
    # A leaf may import only other such leaves: so no Trio reaches the layer through one.
    assert violations(path.read_text(encoding="utf-8"), leaf) == []


@pytest.mark.parametrize(
    ("source", "culprit"),
    [
        ("import trio\n", "trio"),
        ("from trio import lowlevel\n", "trio"),
        ("def f():\n    import trio_util\n", "trio_util"),
        ("if TYPE_CHECKING:\n    from .._config import PoolConfig\n", "trio_imappool._config"),
        ("from .. import _pool\n", "trio_imappool._pool"),
        ("from trio_imappool._errors import PoolError\n", "trio_imappool._errors"),
        ("from ... import x\n", "..."),
    ],
)
def test_the_check_finds_a_forbidden_import(source: str, culprit: str) -> None:
    problems = violations(source, f"{LAYER}._example")
    assert len(problems) == 1
    assert f"imports {culprit}" in problems[0]


def test_the_check_lets_the_layer_import_itself_and_the_leaves() -> None:
    source = (
        "import imaplib\nfrom imapclient import IMAPClient\nfrom ._fetch import failure\n"
        "from . import _sockets\nfrom .._util import uid_set\nfrom .._commands import FetchData\n"
    )
    assert violations(source, f"{LAYER}._example") == []


def test_every_name_the_layer_exports_is_there() -> None:
    layer = importlib.import_module(LAYER)
    missing = [name for name in layer.__all__ if not hasattr(layer, name)]
    assert missing == []


def test_the_layer_names_the_imapclient_range_pyproject_pins() -> None:
    pyproject = PACKAGE_DIR.parent / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("not a source checkout")
    pinned = re.search(r'"imapclient(>=[^"]+)"', pyproject.read_text(encoding="utf-8"))
    assert pinned is not None
    doc = importlib.import_module(LAYER).__doc__ or ""
    assert f"imapclient{pinned[1]}" in doc
