"""The package's layers, enforced: an AST scan of every import in trio_imappool/.

Every ``import`` and ``from ... import`` counts, wherever it stands: at module level, under
``if TYPE_CHECKING:``, inside a function. The rules (the architecture issue's, as the lead
decided them):

``cycle``
    No import cycle among the package's modules, type-only and function-level imports included.
``leaf``
    The leaves (``_util``, ``_errors``, ``_version``, ``_commands``) import no other module of the
    package but leaves.
``imap``
    ``_imap`` and its modules (the one layer touching imaplib/imapclient internals) import no
    trio, and of the package only leaves and ``_imap`` itself.
``state``
    ``_state`` (the pool's decisions) imports no trio, imaplib, imapclient, socket, ssl,
    threading or select, and of the package only leaves.
``surface``
    ``_fanout*``, ``_idle*``, ``_group_*`` and ``_surface`` never import ``_pool`` (``_group``
    itself may: it opens pools); ``_fanout*``,
    ``_idle*`` and ``_surface`` never import ``_group*``. They take a ``PoolSurface``.
``library-imports-app``
    No library module imports the application (``exporter``, ``cli``; the package's
    ``__main__``, which ``python -m`` runs, counts as part of ``cli``). One exception: the
    package's own ``__init__`` may re-export application names *lazily*, from inside a
    function (its module ``__getattr__``), as the lead allowed; such imports are left out of
    the cycle rule too, since they run only when the name is first asked for.
``app-private``
    The application imports only public names: modules with no ``_``-segment after the
    package's name (``trio_imappool``, ``trio_imappool.testing``, ...), no ``_``-name from
    them, except its own subpackage's private modules; ``cli`` may import ``exporter``, not
    the reverse (``app-direction``).
``testing``
    Only the demo module of ``cli`` imports ``trio_imappool.testing`` (the harness imports
    itself).
``size``
    No module over 600 lines.

Modules are recognised by name, so the rules hold for modules that do not exist yet. The
self-tests build tiny packages in ``tmp_path`` that break one rule each and check that exactly
that violation is reported: the test fails when a rule is broken.
"""

from __future__ import annotations

import ast
import dataclasses
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

import trio_imappool

MAX_LINES = 600
LEAVES = frozenset({"_util", "_errors", "_version", "_commands"})
STATE_FORBIDDEN = frozenset(
    {"trio", "imaplib", "imapclient", "socket", "ssl", "threading", "select"}
)
APPLICATIONS = frozenset({"exporter", "cli"})


@dataclasses.dataclass(frozen=True, order=True)
class Violation:
    """One broken rule: *module* (dotted) imports *target* (dotted, or a description)."""

    rule: str
    module: str
    target: str
    line: int = 0

    def __str__(self) -> str:
        where = f":{self.line}" if self.line else ""
        return f"[{self.rule}] {self.module}{where}: {self.target}"


@dataclasses.dataclass(frozen=True)
class _Import:
    """One import statement's effect: *module* depends on *target*."""

    module: str
    target: str  # a module of the package, or an outside top-level name
    internal: bool
    line: int
    names: tuple[str, ...]  # the names taken (``from x import a, b``), empty for ``import x``
    in_function: bool


# -- reading the package ---------------------------------------------------------------------------


def _modules(package_dir: Path) -> dict[str, Path]:
    """Dotted name -> file, for every ``.py`` file of the package."""
    root = package_dir.name
    found: dict[str, Path] = {}
    for path in sorted(package_dir.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = [root, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _function_ranges(tree: ast.AST) -> list[tuple[int, int]]:
    return [
        (node.lineno, node.end_lineno or node.lineno)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
    ]


def _imports(name: str, path: Path, modules: dict[str, Path]) -> Iterator[_Import]:
    """The imports of module *name* (at *path*), resolved against the package's modules."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    functions = _function_ranges(tree)
    is_package = path.name == "__init__.py"
    own_package = name if is_package else name.rpartition(".")[0]

    def deepest(dotted: str) -> str | None:
        parts = dotted.split(".")
        while parts:
            candidate = ".".join(parts)
            if candidate in modules:
                return candidate
            parts.pop()
        return None

    def make(target: str, line: int, names: tuple[str, ...]) -> _Import:
        inside = any(low <= line <= high for low, high in functions)
        resolved = deepest(target)
        if resolved is not None:
            return _Import(name, resolved, True, line, names, inside)
        return _Import(name, target.partition(".")[0], False, line, names, inside)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield make(alias.name, node.lineno, ())
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = own_package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts)
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            plain: list[str] = []
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in modules:  # ``from . import _pool``: the module itself
                    yield make(submodule, node.lineno, ())
                else:
                    plain.append(alias.name)
            if plain or not node.names:
                yield make(source, node.lineno, tuple(plain))


# -- the rules -------------------------------------------------------------------------------------


def _segments(module: str) -> list[str]:
    """The parts after the package's own name."""
    return module.split(".")[1:]


def _first(module: str) -> str:
    segments = _segments(module)
    return segments[0] if segments else ""


def _is_leaf(module: str) -> bool:
    return len(_segments(module)) == 1 and _first(module) in LEAVES


def _is_imap(module: str) -> bool:
    return _first(module) == "_imap"


def _is_state(module: str) -> bool:
    return _segments(module) == ["_state"]


def _is_pool(module: str) -> bool:
    first = _first(module)
    return first == "_pool" or first.startswith("_pool_")


def _is_group(module: str) -> bool:
    return _first(module).startswith("_group")


def _is_group_helper(module: str) -> bool:
    """A module of the group other than ``_group`` itself, which opens pools."""
    return _is_group(module) and _segments(module) != ["_group"]


def _is_fanout_idle_surface(module: str) -> bool:
    first = _first(module)
    return first.startswith(("_fanout", "_idle")) or _segments(module) == ["_surface"]


def _application(module: str) -> str | None:
    """The application subpackage *module* belongs to; ``__main__`` (``python -m``) is the CLI's."""
    if _segments(module) == ["__main__"]:
        return "cli"
    first = _first(module)
    return first if first in APPLICATIONS else None


def _is_testing(module: str) -> bool:
    return _first(module) == "testing"


def _is_cli_demo(module: str) -> bool:
    """``cli.demo``, ``cli._demo`` or a module inside either."""
    segments = _segments(module)
    return segments[:1] == ["cli"] and any(s.lstrip("_") == "demo" for s in segments[1:])


def _is_public(module: str) -> bool:
    return not any(part.startswith("_") for part in _segments(module))


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component: list[str] = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        for node in sorted(edges):
            if node not in index:
                visit(node)
    finally:
        sys.setrecursionlimit(limit)
    return sorted(found)


def _check_import(imp: _Import, root: str) -> Iterable[Violation]:
    module, target = imp.module, imp.target
    # The harness imports itself freely; ``import trio_imappool.x`` from outside is no import
    # of the module itself.
    if not imp.internal:
        if _is_imap(module) and target == "trio":
            yield Violation("imap", module, target, imp.line)
        if _is_state(module) and target in STATE_FORBIDDEN:
            yield Violation("state", module, target, imp.line)
        return
    if target == module:
        return
    if _is_leaf(module) and not _is_leaf(target):
        yield Violation("leaf", module, target, imp.line)
    if _is_imap(module) and not (_is_leaf(target) or _is_imap(target)):
        yield Violation("imap", module, target, imp.line)
    if _is_state(module) and not _is_leaf(target):
        yield Violation("state", module, target, imp.line)
    if (_is_fanout_idle_surface(module) or _is_group_helper(module)) and _is_pool(target):
        yield Violation("surface", module, target, imp.line)
    if _is_fanout_idle_surface(module) and _is_group(target):
        yield Violation("surface", module, target, imp.line)
    app, target_app = _application(module), _application(target)
    if app is None and target_app is not None:
        lazy_reexport = module == root and imp.in_function
        if not lazy_reexport:
            yield Violation("library-imports-app", module, target, imp.line)
    if app is not None:
        own = target_app == app
        if not own and not _is_public(target):
            yield Violation("app-private", module, target, imp.line)
        private_names = [n for n in imp.names if n.startswith("_") and not n.startswith("__")]
        if not own and private_names:
            yield Violation("app-private", module, f"{target}.{private_names[0]}", imp.line)
        if app == "exporter" and target_app == "cli":
            yield Violation("app-direction", module, target, imp.line)
    if _is_testing(target) and not _is_testing(module) and not _is_cli_demo(module):
        yield Violation("testing", module, target, imp.line)


def check_layers(package_dir: Path, *, max_lines: int = MAX_LINES) -> list[Violation]:
    """Every violation of the layering rules in the package at *package_dir*, sorted.

    The package's name is the folder's name; the rules recognise modules by name.
    """
    modules = _modules(package_dir)
    root = package_dir.name
    violations: list[Violation] = []
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > max_lines:
            violations.append(Violation("size", name, f"{lines} lines > {max_lines}"))
        for imp in _imports(name, path, modules):
            violations.extend(_check_import(imp, root))
            if imp.internal and imp.target != name:
                lazy_reexport = name == root and imp.in_function
                if not (lazy_reexport and _application(imp.target)):
                    edges[name].add(imp.target)
    for component in _cycles(edges):
        violations.append(Violation("cycle", component[0], " <-> ".join(component)))
    return sorted(set(violations))


# -- the real package ------------------------------------------------------------------------------


def test_the_package_keeps_its_layers() -> None:
    package_dir = Path(trio_imappool.__file__).parent
    violations = check_layers(package_dir)
    assert not violations, "\n" + "\n".join(map(str, violations))


# -- the checker, on tiny packages that break one rule each ----------------------------------------


def make_package(tmp_path: Path, files: dict[str, str]) -> Path:
    """A package ``pkg`` in *tmp_path* with *files* (relative path -> source); every folder
    gets an ``__init__.py`` unless given."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for relative, source in files.items():
        path = package / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        folder = path.parent
        while folder != package:
            init = folder / "__init__.py"
            if not init.exists():
                init.write_text("")
            folder = folder.parent
        path.write_text(source)
    return package


#: A package that keeps every rule, and uses every kind of import the rules look at.
GOOD = {
    "_util.py": "import re\n",
    "_errors.py": "from . import _util\n",
    "_version.py": "VERSION = '1'\n",
    "_commands.py": "from ._errors import PoolError\n",
    "_imap/__init__.py": (
        "import imaplib\nfrom .._errors import ConnectError\nfrom . import _wire\n"
    ),
    "_imap/_wire.py": "import imapclient\nfrom .. import _util\n",
    "_state.py": "import heapq\nfrom ._util import uid_set\n",
    "_surface.py": (
        "from typing import TYPE_CHECKING, Protocol\n"
        "if TYPE_CHECKING:\n    from ._config import PoolConfig\n"
    ),
    "_config.py": "from ._errors import ConfigurationError\n",
    "_client.py": "import trio\nfrom ._imap import connect\n",
    "_connection.py": "from ._client import Client\n",
    "_pool.py": (
        "import trio\nfrom ._state import PoolState\nfrom ._connection import Connection\n"
        "from ._fanout import fetch_many\nfrom ._idle import idle\n"
    ),
    "_fanout.py": "from ._surface import PoolSurface\n",
    "_fanout_plan.py": "from ._util import uid_set\n",
    "_idle.py": "from ._surface import PoolSurface\nfrom ._imap import _wire\n",
    "_group.py": "from ._surface import PoolSurface\nfrom ._fanout import fetch_many\n",
    "wire.py": "from ._imap import _wire\n",
    "testing/__init__.py": "from ._server import start\nfrom .. import _util\n",
    "testing/_server.py": "import pkg.testing._seed\n",
    "testing/_seed.py": "import pkg\n",
    "exporter/__init__.py": "from ._naming import name\nfrom pkg import open_pool, wire\n",
    "exporter/_naming.py": "import pkg\nfrom pkg.wire import quote\n",
    "cli/__init__.py": "from ._main import main\n",
    "cli/_main.py": "from pkg.exporter import export_maildir\nfrom . import _demo\n",
    "cli/_demo.py": "from pkg.testing import start\nimport pkg.testing\n",
    "__main__.py": "from .cli import main\n",
}
GOOD["__init__.py"] = (
    "from ._pool import open_pool\nfrom . import wire\n"
    "def __getattr__(name):\n    from .exporter import export_maildir\n    return export_maildir\n"
)


def test_a_package_that_keeps_every_rule_passes(tmp_path: Path) -> None:
    files = dict(GOOD)
    init = files.pop("__init__.py")
    package = make_package(tmp_path, files)
    (package / "__init__.py").write_text(init)
    assert check_layers(package) == []


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        pytest.param(
            {"_connection.py": "from ._pool import Pool\n"},
            [Violation("cycle", "pkg._connection", "pkg._connection <-> pkg._pool")],
            id="cycle",
        ),
        pytest.param(
            {
                "_connection.py": (
                    "from typing import TYPE_CHECKING\n"
                    "if TYPE_CHECKING:\n    from ._pool import Pool\n"
                )
            },
            [Violation("cycle", "pkg._connection", "pkg._connection <-> pkg._pool")],
            id="cycle-type-only",
        ),
        pytest.param(
            {"_connection.py": "def f():\n    from . import _pool\n"},
            [Violation("cycle", "pkg._connection", "pkg._connection <-> pkg._pool")],
            id="cycle-in-a-function",
        ),
        pytest.param(
            {"_version.py": "from ._config import PoolConfig\n"},
            [Violation("leaf", "pkg._version", "pkg._config", 1)],
            id="leaf-imports-core",
        ),
        pytest.param(
            {"_version.py": "import pkg.wire\n"},
            [Violation("leaf", "pkg._version", "pkg.wire", 1)],
            id="leaf-imports-public-module",
        ),
        pytest.param(
            {"_imap/_wire.py": "import imapclient\nimport trio\n"},
            [Violation("imap", "pkg._imap._wire", "trio", 2)],
            id="imap-imports-trio",
        ),
        pytest.param(
            {"_imap/_wire.py": "from trio import lowlevel\n"},
            [Violation("imap", "pkg._imap._wire", "trio", 1)],
            id="imap-imports-from-trio",
        ),
        pytest.param(
            {"_imap/_wire.py": "from .._config import PoolConfig\n"},
            [Violation("imap", "pkg._imap._wire", "pkg._config", 1)],
            id="imap-imports-core",
        ),
        pytest.param(
            {"_state.py": "import heapq\nimport threading\n"},
            [Violation("state", "pkg._state", "threading", 2)],
            id="state-imports-threading",
        ),
        pytest.param(
            {"_state.py": "def f():\n    import trio\n"},
            [Violation("state", "pkg._state", "trio", 2)],
            id="state-imports-trio-in-a-function",
        ),
        pytest.param(
            {"_state.py": "from ._imap import _wire\n"},
            [Violation("state", "pkg._state", "pkg._imap._wire", 1)],
            id="state-imports-imap",
        ),
        pytest.param(
            {
                "_fanout_types.py": (
                    "from typing import TYPE_CHECKING\n"
                    "if TYPE_CHECKING:\n    from ._pool import Pool\n"
                )
            },
            [Violation("surface", "pkg._fanout_types", "pkg._pool", 3)],
            id="fanout-imports-pool-for-types",
        ),
        pytest.param(
            {"_idle_reader.py": "from ._pool import Pool\n"},
            [Violation("surface", "pkg._idle_reader", "pkg._pool", 1)],
            id="idle-module-imports-pool",
        ),
        pytest.param(
            {"_group_core.py": "from ._pool import Pool\n"},
            [Violation("surface", "pkg._group_core", "pkg._pool", 1)],
            id="group-helper-imports-pool",
        ),
        pytest.param(
            {"_fanout_plan.py": "from ._group import PoolGroup\n"},
            [Violation("surface", "pkg._fanout_plan", "pkg._group", 1)],
            id="fanout-imports-group",
        ),
        pytest.param(
            {"_surface.py": "from . import _group_stats\n", "_group_stats.py": "X = 1\n"},
            [Violation("surface", "pkg._surface", "pkg._group_stats", 1)],
            id="surface-imports-group",
        ),
        pytest.param(
            {"_budget.py": "from .exporter import export_maildir\n"},
            [Violation("library-imports-app", "pkg._budget", "pkg.exporter", 1)],
            id="library-imports-exporter",
        ),
        pytest.param(
            {"testing/_extra.py": "def f():\n    import pkg.cli\n"},
            [Violation("library-imports-app", "pkg.testing._extra", "pkg.cli", 2)],
            id="harness-imports-cli",
        ),
        pytest.param(
            {"exporter/_naming.py": "from pkg._pool import Pool\n"},
            [Violation("app-private", "pkg.exporter._naming", "pkg._pool", 1)],
            id="exporter-imports-private-module",
        ),
        pytest.param(
            {"exporter/_naming.py": "from .. import _config\n"},
            [Violation("app-private", "pkg.exporter._naming", "pkg._config", 1)],
            id="exporter-imports-private-module-relatively",
        ),
        pytest.param(
            {"exporter/_naming.py": "from pkg.wire import _quote\n"},
            [Violation("app-private", "pkg.exporter._naming", "pkg.wire._quote", 1)],
            id="exporter-imports-private-name",
        ),
        pytest.param(
            {"cli/_main.py": "from pkg.exporter._naming import name\n"},
            [Violation("app-private", "pkg.cli._main", "pkg.exporter._naming", 1)],
            id="cli-imports-exporter-internals",
        ),
        pytest.param(
            {"exporter/_extra.py": "import pkg.cli\n"},
            [Violation("app-direction", "pkg.exporter._extra", "pkg.cli", 1)],
            id="exporter-imports-cli",
        ),
        pytest.param(
            {"cli/_main.py": "import pkg.testing\n"},
            [Violation("testing", "pkg.cli._main", "pkg.testing", 1)],
            id="cli-main-imports-testing",
        ),
        pytest.param(
            {"exporter/_naming.py": "from pkg.testing import start\n"},
            [Violation("testing", "pkg.exporter._naming", "pkg.testing", 1)],
            id="exporter-imports-testing",
        ),
        pytest.param(
            {"_budget.py": "def f():\n    from .testing import start\n"},
            [Violation("testing", "pkg._budget", "pkg.testing", 2)],
            id="library-imports-testing",
        ),
        pytest.param(
            {"testing/_big.py": "x = 1\n" * 601},
            [Violation("size", "pkg.testing._big", "601 lines > 600")],
            id="module-over-600-lines",
        ),
    ],
)
def test_the_checker_reports_exactly_the_broken_rule(
    tmp_path: Path, change: dict[str, str], expected: list[Violation]
) -> None:
    files = {**GOOD, **change}
    init = files.pop("__init__.py")
    package = make_package(tmp_path, files)
    (package / "__init__.py").write_text(init)
    assert check_layers(package) == expected


def test_the_package_init_may_not_import_the_application_eagerly(tmp_path: Path) -> None:
    files = dict(GOOD)
    files.pop("__init__.py")
    package = make_package(tmp_path, files)
    (package / "__init__.py").write_text("from .exporter import export_maildir\n")
    assert check_layers(package) == [
        Violation("cycle", "pkg", "pkg <-> pkg.exporter <-> pkg.exporter._naming"),
        Violation("library-imports-app", "pkg", "pkg.exporter", 1),
    ]


def test_exactly_600_lines_is_allowed(tmp_path: Path) -> None:
    package = make_package(tmp_path, {"_big.py": "x = 1\n" * 600})
    assert check_layers(package) == []
