"""The package's shape: small modules, short functions, imports that only go down the stack."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bayes_fusion"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80  # code lines: the docstring is not counted


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> list[str]:
    """Package modules an ``import`` statement inside ``module`` pulls in."""
    if node.level:
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module or ""
    if not base.startswith("bayes_fusion"):
        return []
    targets = [f"{base}.{alias.name}" for alias in node.names]
    # "from . import submodule" imports the submodule; "from .x import name" imports x
    return [t for t in targets if t in MODULES] or [base]


def _imports(module: str) -> set[str]:
    path = MODULES[module]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            found.update(_resolve(module, path, node))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("bayes_fusion"))
    return found - {module}


def test_module_sizes():
    too_long = {
        m: n
        for m, p in MODULES.items()
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines: {too_long}"


def test_function_sizes():
    too_long = {}
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            lines = node.end_lineno - node.lineno + 1
            if ast.get_docstring(node) is not None:
                doc = node.body[0]
                lines -= doc.end_lineno - doc.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                too_long[f"{module}.{node.name}"] = lines
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} code lines: {too_long}"


def test_no_module_imports_the_package_root():
    offenders = {m for m in MODULES if m != "bayes_fusion" and "bayes_fusion" in _imports(m)}
    assert not offenders, f"import the package __init__ (upwards): {sorted(offenders)}"


def test_imports_go_down_the_stack():
    """The graph of imports between the package's modules (lazy ones included) is acyclic."""
    graph = {m: _imports(m) & set(MODULES) for m in MODULES}
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_layout_checker_sees_a_cycle_and_a_root_import():
    """The checks above can fail: a resolved upward import is found."""
    node = ast.parse("from . import __version__").body[0]
    path = MODULES["bayes_fusion.summary"]
    assert _resolve("bayes_fusion.summary", path, node) == ["bayes_fusion"]
    node = ast.parse("from ..guides import GUIDES").body[0]
    infer = MODULES["bayes_fusion.infer.svi"]
    assert _resolve("bayes_fusion.infer.svi", infer, node) == ["bayes_fusion.guides"]
