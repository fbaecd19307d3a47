"""The layers of ``src/arbiter`` point one way, and no two of its modules import each other.

The rules are written down in docs/architecture.md ("Layers"); ``LAYERS`` below is the same table. The
check reads the source with ``ast`` and never imports it: every import counts, including those under
``if TYPE_CHECKING:`` and inside functions, since a cycle or an upward dependency there is one all the
same (it only moves the failure to a later moment).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "arbiter"

# Bottom up. A unit is a package of src/arbiter or one of its top-level modules. A unit may import
# itself and any unit of a lower layer; units of the same layer are independent of each other, except
# in the base layer, whose modules may use one another.
LAYERS: tuple[tuple[str, frozenset[str]], ...] = (
    (
        "base",
        frozenset(
            {
                "errors",
                "settings",
                "settings_check",
                "redis_errors",
                "http_scope",
                "globs",
                "naming",
                "net",
                "ticks",
                "telemetry",
                "admission",
            }
        ),
    ),
    ("store", frozenset({"store"})),
    ("auth", frozenset({"auth"})),
    ("rules", frozenset({"policies", "limits"})),
    ("audit", frozenset({"audit"})),
    ("integrity", frozenset({"integrity"})),
    ("proxy", frozenset({"proxy"})),
    ("runtime", frozenset({"runtime"})),
    ("surface", frozenset({"admin", "console", "probes", "wellknown", "metrics_route"})),
    ("app", frozenset({"app", "serving", "migrations"})),
    ("demo", frozenset({"demo"})),
    ("cli", frozenset({"cli"})),
)
PEERS_MAY_IMPORT = frozenset({"base"})


@dataclass(frozen=True)
class Import:
    importer: str  # module name, e.g. arbiter.proxy.registry
    path: str  # the importer's file, relative to the repository
    line: int
    target: str  # the module imported, e.g. arbiter.admin.schemas


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_modules(src: Path = SRC) -> dict[str, tuple[str, str]]:
    """Every module under src/arbiter: name -> (path shown in messages, source text)."""
    repo = src.parent
    return {
        module_name(p, src): (str(p.relative_to(repo)), p.read_text(encoding="utf-8"))
        for p in sorted((src / ROOT).rglob("*.py"))
    }


def _resolve(name: str, modules: Mapping[str, object]) -> str:
    """The module ``name`` refers to: itself, or the nearest package or module holding it."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return name  # not a module of ours: reported as such


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _dynamic(node: ast.Call) -> str | None:
    """``importlib.import_module("arbiter.…")`` and ``__import__("arbiter.…")`` with a literal name."""
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    if called in ("import_module", "__import__") and node.args:
        first = node.args[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            return first.value
    return None


def imports_of(modules: Mapping[str, tuple[str, str]]) -> Iterator[Import]:
    """Every import of one of our modules, wherever in the file it is."""
    ours = f"{ROOT}."
    for importer, (path, text) in modules.items():
        is_package = path.endswith("__init__.py")
        for node in ast.walk(ast.parse(text, filename=path)):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node, importer, is_package)
                # ``from arbiter.proxy import registry`` imports the module arbiter.proxy.registry.
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            elif isinstance(node, ast.Call) and (dynamic := _dynamic(node)) is not None:
                names = [dynamic]
            else:
                continue
            for name in dict.fromkeys(names):
                if name == ROOT or name.startswith(ours):
                    yield Import(importer, path, node.lineno, _resolve(name, modules))


def unit_of(module: str) -> str:
    """The package or top-level module of src/arbiter that ``module`` belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def layer_of(unit: str) -> int | None:
    for index, (_, units) in enumerate(LAYERS):
        if unit in units:
            return index
    return None


def _may_import(index: int) -> str:
    lower = [name for name, _ in LAYERS[:index]]
    if LAYERS[index][0] in PEERS_MAY_IMPORT:
        lower.append(f"other {LAYERS[index][0]} modules")
    return ", ".join(lower) or "nothing else of Arbiter"


def unmapped(modules: Iterable[str]) -> list[str]:
    return sorted(m for m in modules if layer_of(unit_of(m)) is None)


def layer_violations(found: Iterable[Import], modules: Mapping[str, object]) -> list[str]:
    """One readable line per import that points up a layer or across to a peer."""
    out: list[str] = []
    for imp in found:
        where = f"{imp.path}:{imp.line} imports {imp.target}"
        if imp.target not in modules:
            out.append(f"{where}, which is not a module under src/{ROOT}")
            continue
        src_unit, dst_unit = unit_of(imp.importer), unit_of(imp.target)
        src_layer, dst_layer = layer_of(src_unit), layer_of(dst_unit)
        if src_unit == dst_unit or src_layer is None or dst_layer is None:
            continue  # within one package (cycles are checked apart); unmapped units are reported apart
        src_name, dst_name = LAYERS[src_layer][0], LAYERS[dst_layer][0]
        if dst_layer > src_layer:
            rule = f"{src_unit} (layer {src_name}) may not import {dst_unit} (layer {dst_name}, above it)"
        elif dst_layer == src_layer and src_name not in PEERS_MAY_IMPORT:
            rule = f"{src_unit} and {dst_unit} are peers in layer {src_name} and may not import each other"
        else:
            continue
        out.append(f"{where}: {rule}; {src_unit} may import {_may_import(src_layer)}")
    return out


def cycles(found: Iterable[Import]) -> list[list[Import]]:
    """One cycle per strongly connected group of modules (Tarjan), as the imports that close it."""
    edges: dict[str, dict[str, Import]] = {}
    for imp in found:
        edges.setdefault(imp.importer, {}).setdefault(imp.target, imp)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(node: str) -> None:  # recursion depth is bounded by the number of modules
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, {}):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group: list[str] = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in edges.get(node, {}):
                groups.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return [_one_cycle(group, edges) for group in groups]


def _one_cycle(group: list[str], edges: Mapping[str, Mapping[str, Import]]) -> list[Import]:
    """The shortest way from the group's first module back to itself, within the group."""
    start, members = group[0], set(group)
    paths: dict[str, list[Import]] = {start: []}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt, imp in sorted(edges.get(node, {}).items()):
            if nxt == start:
                return [*paths[node], imp]
            if nxt in members and nxt not in paths:
                paths[nxt] = [*paths[node], imp]
                queue.append(nxt)
    raise AssertionError(f"no cycle through {start}")  # pragma: no cover - a group always has one


def describe(cycle: list[Import]) -> str:
    chain = " -> ".join([cycle[0].importer, *(imp.target for imp in cycle)])
    steps = "; ".join(f"{imp.path}:{imp.line} imports {imp.target}" for imp in cycle)
    return f"import cycle {chain} ({steps})"


# --- the checks on src/arbiter ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def modules() -> dict[str, tuple[str, str]]:
    found = source_modules()
    assert f"{ROOT}.proxy.registry" in found, f"no sources found under {SRC}"
    return found


def test_every_module_has_a_layer(modules: dict[str, tuple[str, str]]) -> None:
    missing = unmapped(modules)
    if missing:
        pytest.fail(
            "modules whose package is in no layer (add it to LAYERS here and to docs/architecture.md):\n  "
            + "\n  ".join(missing),
            pytrace=False,
        )


def test_imports_point_down_the_layers(modules: dict[str, tuple[str, str]]) -> None:
    broken = layer_violations(imports_of(modules), modules)
    if broken:
        pytest.fail(
            "imports against the layering (docs/architecture.md, Layers):\n  " + "\n  ".join(broken),
            pytrace=False,
        )


def test_no_import_cycles(modules: dict[str, tuple[str, str]]) -> None:
    found = cycles(imports_of(modules))
    if found:
        pytest.fail("modules that import each other:\n  " + "\n  ".join(map(describe, found)), pytrace=False)


# --- the checker itself, on made-up sources ----------------------------------------------------------


def _fake(**sources: str) -> dict[str, tuple[str, str]]:
    out: dict[str, tuple[str, str]] = {}
    for key, text in sources.items():
        name = key.replace("__", ".")
        package = name.endswith(".init")
        name = name.removesuffix(".init")
        path = "src/" + name.replace(".", "/") + ("/__init__.py" if package else ".py")
        out[name] = (path, text)
    return out


def test_checker_sees_imports_under_type_checking_in_functions_and_relative() -> None:
    fake = _fake(
        arbiter__errors="",
        arbiter__proxy__init="",
        arbiter__proxy__registry="",
        arbiter__admin__init="",
        arbiter__admin__schemas="",
        arbiter__audit__events=(
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n"
            "    from arbiter.proxy import registry\n"
            "def f():\n"
            "    import arbiter.admin.schemas\n"
            "from ..errors import X\n"
            "import importlib\n"
            "importlib.import_module('arbiter.proxy.registry')\n"
        ),
    )
    found = sorted((i.line, i.target) for i in imports_of(fake))
    assert found == [
        (3, "arbiter.proxy.registry"),
        (5, "arbiter.admin.schemas"),
        (6, "arbiter.errors"),
        (8, "arbiter.proxy.registry"),
    ]
    broken = layer_violations(imports_of(fake), fake)
    assert len(broken) == 3
    assert broken[0].startswith("src/arbiter/audit/events.py:3 imports arbiter.proxy.registry: audit")
    assert "may not import proxy (layer proxy, above it)" in broken[0]


def test_checker_reports_peers_and_allows_lower_layers() -> None:
    fake = _fake(
        arbiter__settings="import arbiter.globs\n",
        arbiter__globs="",
        arbiter__limits__limiter="from arbiter.policies.engine import E\nfrom arbiter.settings import S\n",
        arbiter__policies__engine="from arbiter.store.models import M\n",
        arbiter__store__models="",
    )
    broken = layer_violations(imports_of(fake), fake)
    assert broken == [
        "src/arbiter/limits/limiter.py:1 imports arbiter.policies.engine: limits and policies are peers "
        "in layer rules and may not import each other; limits may import base, store, auth"
    ]
    assert unmapped([*fake, "arbiter.gateway.spans"]) == ["arbiter.gateway.spans"]


def test_checker_finds_cycles_however_they_are_imported() -> None:
    fake = _fake(
        arbiter__proxy__a=(
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from arbiter.proxy.b import B\n"
        ),
        arbiter__proxy__b="def f():\n    from arbiter.proxy import c\n",
        arbiter__proxy__c="import arbiter.proxy.a\n",
        arbiter__proxy__d="import arbiter.proxy.a\n",
    )
    [cycle] = cycles(imports_of(fake))
    assert describe(cycle) == (
        "import cycle arbiter.proxy.a -> arbiter.proxy.b -> arbiter.proxy.c -> arbiter.proxy.a "
        "(src/arbiter/proxy/a.py:3 imports arbiter.proxy.b; src/arbiter/proxy/b.py:2 imports "
        "arbiter.proxy.c; src/arbiter/proxy/c.py:1 imports arbiter.proxy.a)"
    )
    acyclic = {k: v for k, v in fake.items() if k != "arbiter.proxy.c"}
    assert cycles(imports_of(acyclic)) == []
