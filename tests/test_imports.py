"""The import graph of perceiver_np runs one way: no module imports, even inside a function,
a module that imports it back (``if TYPE_CHECKING:`` blocks, which never run, are left out).

The layers (docs/architecture.md): leaf constants and shapes -> kernels -> plain layers ->
blocks and backends -> the inference engine and the model -> training, interop, the CLI. And
the teaching layers are plain NumPy: perceiver_np/layers.py imports no kernel and no Numba.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module_files() -> dict[str, Path]:
    files = {f"perceiver_np.{p.stem}": p for p in (ROOT / "perceiver_np").glob("*.py")}
    files.update({f"perceiver_np.kernels.{p.stem}": p for p in (ROOT / "kernels").glob("*.py")})
    return {name.removesuffix(".__init__"): p for name, p in files.items()}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``module`` imports at any depth of its code, TYPE_CHECKING left out."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:  # "from . import layers" names a module, "from .x import f" not
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    # a module imports its target; "perceiver_np.kernels.gemm" also runs "perceiver_np.kernels"
    out = set()
    for name in found:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            out.add(name)
    return out


def _graph() -> dict[str, set[str]]:
    files = _module_files()
    known = set(files)
    return {m: _imports(m, p, known) for m, p in files.items()}


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    graph.pop("perceiver_np")  # the package's __init__ imports its modules; none imports it back
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep):], dep])
            elif dep not in state:
                walk(dep, [*stack, dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node, [node])
    assert cycles == []


def test_no_module_imports_the_package_init():
    graph = _graph()
    importers = sorted(m for m, deps in graph.items() if m != "perceiver_np" and "perceiver_np" in deps)
    assert importers == []


def test_the_teaching_layers_are_plain_numpy():
    deps = _graph()["perceiver_np.layers"]
    assert not any(d.startswith("perceiver_np.kernels") for d in deps), deps
    source = (ROOT / "perceiver_np" / "layers.py").read_text()
    assert "numba" not in {a.name.split(".")[0] for n in ast.walk(ast.parse(source))
                           if isinstance(n, ast.Import) for a in n.names}
    assert not any(isinstance(n, ast.ImportFrom) and (n.module or "").startswith("numba")
                   for n in ast.walk(ast.parse(source)))


def test_the_kernels_import_only_leaf_modules_of_the_package():
    graph = _graph()
    for module, deps in graph.items():
        if module.startswith("perceiver_np.kernels"):
            outside = {d for d in deps if not d.startswith("perceiver_np.kernels")}
            assert outside <= {"perceiver_np.constants", "perceiver_np.shapes"}, (module, outside)
