"""Layering of the package, read from the source with ``ast``: who may import whom, and no import cycles.

    formats and algorithms (gguf/, int4/, quant/, onnx_export/, card.py, ...) at the bottom
    the calibration driver and runtimes above them
    pipelines (qconvert/pipelines/, qconvert/release/) above those
    the CLI (qconvert/cli.py, qconvert/commands/) on top; nothing points back up

Every import counts: module level, inside ``if TYPE_CHECKING:``, and inside functions (a lazy import is still a
dependency). Imports made by name at run time (``importlib.import_module``) are not seen.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "qconvert"

CLI = ("qconvert/cli.py", "qconvert/__main__.py", "qconvert/commands/")
FIXTURE_USERS = (
    "qconvert/fixtures/",
    "qconvert/commands/demo.py",  # the demo command runs on the demo model; `qconvert release` borrows it from there
)
PIPELINE_USERS = CLI + ("qconvert/pipelines/", "qconvert/release/")


@dataclass(frozen=True)
class Import:
    source: str  # importing module's path relative to the repository, e.g. qconvert/release/build.py
    target: str  # dotted name of the imported module (``from a.b import c``: a.b.c if that is a module, else a.b)
    line: int
    when: str  # "module", "type_checking" or "function"


def _module_names() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _module_names()


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path) -> Iterator[Import]:
    rel = path.relative_to(ROOT).as_posix()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def walk(node: ast.AST, when: str) -> Iterator[Import]:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(rel, alias.name, node.lineno, when)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield Import(rel, full if full in MODULES else base, node.lineno, when)
        elif isinstance(node, ast.If) and when == "module" and _type_checking(node.test):
            for child in node.body:
                yield from walk(child, "type_checking")
            for child in node.orelse:
                yield from walk(child, when)
        else:
            inner = "function" if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) else when
            for child in ast.iter_child_nodes(node):
                yield from walk(child, inner)

    yield from walk(ast.parse(path.read_text(encoding="utf-8"), str(path)), "module")


def all_imports() -> list[Import]:
    return [imp for name, path in sorted(MODULES.items()) for imp in _imports(name, path)]


def _under(target: str, package: str) -> bool:
    return target == package or target.startswith(package + ".")


def _violations(imports: list[Import], targets: tuple[str, ...], allowed: tuple[str, ...]) -> list[str]:
    return [f"{i.source}:{i.line} imports {i.target} ({i.when} level)" for i in imports
            if any(_under(i.target, t) for t in targets) and not i.source.startswith(allowed)]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the DFS stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def import_graph(imports: list[Import], when: tuple[str, ...], exclude: str = "") -> dict[str, set[str]]:
    by_path = {p.relative_to(ROOT).as_posix(): n for n, p in MODULES.items()}
    graph: dict[str, set[str]] = {n: set() for n in MODULES}
    for i in imports:
        src = by_path[i.source]
        excluded = bool(exclude) and (_under(src, exclude) or _under(i.target, exclude))
        if i.when in when and i.target in MODULES and i.target != src and not excluded:
            graph[src].add(i.target)
    return graph


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    return all_imports()


def test_the_import_walker_sees_every_kind_of_import(imports) -> None:
    kinds = {(i.source, i.target, i.when) for i in imports}
    assert ("qconvert/pipelines/int4.py", "qconvert.card", "module") in kinds
    assert ("qconvert/pipelines/int4.py", "qconvert.calibration.stats", "type_checking") in kinds
    assert ("qconvert/pipelines/int4.py", "qconvert.calibration.quantize", "function") in kinds
    assert ("qconvert/release/build.py", "qconvert.release.manifest", "module") in kinds


def test_only_the_cli_imports_the_cli(imports) -> None:
    bad = _violations(imports, ("qconvert.commands", "qconvert.cli"), CLI)
    assert not bad, "library modules must not import the CLI (move the code into the library):\n" + "\n".join(bad)


def test_product_code_does_not_import_test_fixtures(imports) -> None:
    bad = _violations(imports, ("qconvert.fixtures",), FIXTURE_USERS)
    assert not bad, "product code must not import qconvert.fixtures:\n" + "\n".join(bad)


def test_nothing_below_the_pipelines_imports_them(imports) -> None:
    bad = _violations(imports, ("qconvert.pipelines", "qconvert.release"), PIPELINE_USERS)
    assert not bad, "formats, algorithms, the driver and runtimes must not import pipelines:\n" + "\n".join(bad)


def test_no_import_cycles_at_import_time(imports) -> None:
    cycle = find_cycle(import_graph(imports, ("module", "type_checking")))
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle or [])


def test_no_import_cycles_in_product_code_counting_lazy_imports(imports) -> None:
    """Function-level imports hide a cycle from the interpreter, not from the reader; the fixtures (test code,
    whose ``models`` builds the trained demo lazily through ``train``) are left out."""
    cycle = find_cycle(import_graph(imports, ("module", "type_checking", "function"), exclude="qconvert.fixtures"))
    assert cycle is None, "import cycle (counting function-level imports): " + " -> ".join(cycle or [])


def test_find_cycle_reports_the_path() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_import_qconvert_and_the_cli_parser_stay_cheap() -> None:
    """``import qconvert`` and building the parser import no torch; the public names resolve on first use."""
    code = ("import sys, qconvert, qconvert.cli\n"
            "qconvert.cli.build_parser()\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'onnx', 'numba') if m in sys.modules)\n"
            "assert not heavy, heavy\n"
            "assert sorted(qconvert.__all__) == sorted(['__version__', *qconvert._API])\n"
            "missing = [n for n in qconvert.__all__ if not hasattr(qconvert, n)]\n"
            "assert not missing, missing\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr
