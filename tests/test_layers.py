"""The layer rule of docs/architecture.md, enforced: every import of ``src/bigmodel_cli`` (including
those inside functions and under ``if TYPE_CHECKING:``) goes to the module's own layer or below,
no two modules import each other through any chain, and no private name crosses a module boundary.

The import graph is read from the source with ``ast``, so it sees the lazy imports that a runtime
trace of ``import bigmodel_cli`` would miss. The checks run on a tiny package in ``tmp_path`` first,
so that a checker that silently stopped finding anything would fail here too.
"""

from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "bigmodel_cli"

# Bottom to top; a module may import from its own layer or any layer below. The first matching
# prefix decides, so a package's modules are listed before the package.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("errors", ("bigmodel_cli.errors",)),
    ("files: where and how files are read and written", ("bigmodel_cli.input_file", "bigmodel_cli.outputs", "bigmodel_cli.output_file",
                                                  "bigmodel_cli.output_lock", "bigmodel_cli.output_staging")),
    ("config, weights, data, models", ("bigmodel_cli.config", "bigmodel_cli.weights", "bigmodel_cli.data",
                                       "bigmodel_cli.models")),
    ("artifact", ("bigmodel_cli.artifact", "bigmodel_cli.artifact_format", "bigmodel_cli.artifact_files")),
    ("engine.core", ("bigmodel_cli.engine.core",)),
    ("engine.onnx", ("bigmodel_cli.engine.onnx",)),
    ("engine commands", tuple(f"bigmodel_cli.engine.{m}" for m in
                              ("backends", "evaluate", "predict", "decoders", "generate", "prompts_file", "chat", "estimate", "info",
                               "inputs", "pretrained"))),
    ("engine.training", ("bigmodel_cli.engine.training",)),
    ("engine.compress, engine.explain", ("bigmodel_cli.engine.compress", "bigmodel_cli.engine.explain")),
    ("engine.compare", ("bigmodel_cli.engine.compare",)),
    ("engine.optimize", ("bigmodel_cli.engine.optimize",)),
    ("cli", ("bigmodel_cli.cli",)),
]
# The lazy public API and ``python -m`` sit above everything; the engine package is a docstring.
UNLAYERED = {"bigmodel_cli", "bigmodel_cli.__main__", "bigmodel_cli.engine"}


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (a submodule when ``from pkg import sub`` names one)
    line: int
    names: tuple[str, ...]  # the names taken from target ("from x import a, b"); () for "import x"


def find_modules(root: Path) -> dict[str, Path]:
    """Dotted name → file, for every module of the package at ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    anchor = base[: len(base) - node.level + 1]
    return ".".join(anchor + ([node.module] if node.module else []))


def find_imports(root: Path) -> list[Import]:
    """Every import of a module of the package by a module of the package, wherever it appears."""
    modules = find_modules(root)
    found = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = _resolve(node, module, path.name == "__init__.py")
                if base not in modules:
                    continue
                from_base = []
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in modules:  # "from pkg import submodule"
                        found.append(Import(module, sub, node.lineno, ()))
                    else:
                        from_base.append(alias.name)
                if from_base:
                    found.append(Import(module, base, node.lineno, tuple(from_base)))
            elif isinstance(node, ast.Import):
                found += [Import(module, alias.name, node.lineno, ()) for alias in node.names if alias.name in modules]
    return [imp for imp in found if imp.target != imp.source]


def layer_of(module: str) -> int | None:
    if module in UNLAYERED:
        return None
    for index, (_name, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise LookupError(module)


def upward_imports(imports: list[Import]) -> list[str]:
    problems = []
    for imp in imports:
        low, high = layer_of(imp.source), layer_of(imp.target)
        if low is not None and high is not None and high > low:
            problems.append(f"{imp.source} (line {imp.line}, layer {LAYERS[low][0]}) imports {imp.target} "
                            f"(layer {LAYERS[high][0]})")
    return problems


def import_circles(imports: list[Import]) -> list[list[str]]:
    """Strongly connected components of two or more modules (Tarjan, iterative)."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        graph.setdefault(imp.source, set()).add(imp.target)
        graph.setdefault(imp.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    circles.append(sorted(component))
    return circles


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(root: Path) -> list[str]:
    """``from x import _y`` and ``x._y`` (x a module of the package) across module boundaries."""
    modules = find_modules(root)
    problems = []
    for imp in find_imports(root):
        problems += [f"{imp.source} (line {imp.line}) imports {imp.target}.{name}" for name in imp.names if _is_private(name)]
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        # names bound to a module of the package in this file ("from pkg import sub as alias")
        bound = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = _resolve(node, module, path.name == "__init__.py")
                bound |= {alias.asname or alias.name for alias in node.names if f"{base}.{alias.name}" in modules}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in bound and _is_private(node.attr)):
                problems.append(f"{module} (line {node.lineno}) uses {node.value.id}.{node.attr}")
    return problems


def defined_names(path: Path) -> set[str] | None:
    """Names a module defines at its top level (also inside top-level if/try); None when it has a
    module ``__getattr__`` and so may define any name."""
    names: set[str] = set()
    body = list(ast.parse(path.read_text(encoding="utf-8")).body)
    while body:
        node = body.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for target in targets for n in ast.walk(target) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, (ast.If, ast.Try)):
            body += node.body + node.orelse + getattr(node, "finalbody", [])
            body += [stmt for handler in getattr(node, "handlers", []) for stmt in handler.body]
    return None if "__getattr__" in names else names


def unresolved_imports(root: Path) -> list[str]:
    """Imports of the package that name a module or a name that does not exist: after a file moves,
    a relative import with the old depth (often a lazy one inside a function) fails only when it runs."""
    modules = find_modules(root)
    problems = []
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = _resolve(node, module, path.name == "__init__.py")
                if base != root.name and not base.startswith(root.name + "."):
                    continue
                if base not in modules:
                    problems.append(f"{module} (line {node.lineno}) imports {base}, which does not exist")
                    continue
                defined = defined_names(modules[base])
                problems += [f"{module} (line {node.lineno}) imports {alias.name} from {base}, which has no such name"
                             for alias in node.names
                             if f"{base}.{alias.name}" not in modules and defined is not None and alias.name not in defined]
            elif isinstance(node, ast.Import):
                problems += [f"{module} (line {node.lineno}) imports {alias.name}, which does not exist"
                             for alias in node.names
                             if alias.name.startswith(root.name + ".") and alias.name not in modules]
    return problems


# --- the checkers can fail ----------------------------------------------------------------------


@pytest.fixture
def bad_package(tmp_path):
    """A package with an upward import (artifact → cli), a circle (engine.core.a ↔ engine.core.b)
    made of a function-level and a TYPE_CHECKING import, imports of a missing name and of a missing
    module (a relative import one level short), and private names crossing modules."""
    root = tmp_path / "bigmodel_cli"
    files = {
        "__init__.py": "",
        "errors.py": "_SECRET = 1\n",
        "artifact.py": "def f():\n    from .cli import app\n\n\ndef g():\n    from .errors import nothing\n",
        "cli/__init__.py": "app = None\n",
        "engine/__init__.py": "",
        "engine/core/__init__.py": "",
        "engine/core/a.py": "def f():\n    from . import b\n    from ..config import x  # one level short\n",
        "engine/core/b.py": textwrap.dedent("""\
            from typing import TYPE_CHECKING
            from ... import errors
            from ...errors import _SECRET
            if TYPE_CHECKING:
                from .a import f
            X = errors._SECRET
        """),
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_the_checks_find_each_kind_of_problem(bad_package):
    imports = find_imports(bad_package)
    assert upward_imports(imports) == [
        "bigmodel_cli.artifact (line 2, layer artifact) imports bigmodel_cli.cli (layer cli)"]
    assert import_circles(imports) == [["bigmodel_cli.engine.core.a", "bigmodel_cli.engine.core.b"]]
    assert unresolved_imports(bad_package) == [
        "bigmodel_cli.artifact (line 6) imports nothing from bigmodel_cli.errors, which has no such name",
        "bigmodel_cli.engine.core.a (line 3) imports bigmodel_cli.engine.config, which does not exist",
    ]
    assert private_imports(bad_package) == [
        "bigmodel_cli.engine.core.b (line 3) imports bigmodel_cli.errors._SECRET",
        "bigmodel_cli.engine.core.b (line 6) uses errors._SECRET",
    ]


# --- the real package -----------------------------------------------------------------------------


def test_every_module_has_a_layer():
    unplaced = []
    for module in find_modules(SRC):
        try:
            layer_of(module)
        except LookupError:
            unplaced.append(module)
    assert not unplaced, f"add these modules to LAYERS in tests/test_layers.py (and docs/architecture.md): {unplaced}"


def test_every_import_of_the_package_resolves():
    problems = unresolved_imports(SRC)
    assert not problems, "imports that would fail when they run:\n" + "\n".join(problems)


def test_no_module_imports_from_a_higher_layer():
    imports = find_imports(SRC)
    assert len(imports) > 100, "the import graph is suspiciously small; is find_imports still reading the source?"
    problems = upward_imports(imports)
    assert not problems, "imports that go up a layer:\n" + "\n".join(problems)


def test_no_import_circles():
    circles = import_circles(find_imports(SRC))
    print(f"import circles among src/bigmodel_cli modules: {len(circles)}")
    assert not circles, "import circles:\n" + "\n".join(" ↔ ".join(c) for c in circles)


def test_no_private_name_crosses_a_module_boundary():
    problems = private_imports(SRC)
    assert not problems, "make these names public (drop the underscore) or move them:\n" + "\n".join(problems)
