"""The package's shape: what users import at the top level, every inference internal under
``infer/``, and imports that only go down the stack (no circle, none through a package
``__init__``)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bayes_fusion"

#: the top level holds what users import (and two private helpers): inference lives in infer/
TOP_LEVEL = {
    "bayes_fusion",
    "bayes_fusion._checks",
    "bayes_fusion._moved",
    "bayes_fusion._version",
    "bayes_fusion.arviz_compat",
    "bayes_fusion.contributions",
    "bayes_fusion.datasets",
    "bayes_fusion.infer",
    "bayes_fusion.layers",
    "bayes_fusion.models",
    "bayes_fusion.ops",
    "bayes_fusion.priors",
    "bayes_fusion.prune",
    "bayes_fusion.rank",
    "bayes_fusion.summary",
}

#: packages whose ``__init__`` imports nothing, so that no import runs in a circle through them
IMPORT_FREE_PACKAGES = ("bayes_fusion.infer.svi", "bayes_fusion.infer.mcmc")


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


def test_top_level_holds_what_users_import():
    top = {m for m in MODULES if m.count(".") <= 1}
    assert top == TOP_LEVEL, f"unexpected top-level modules {sorted(top - TOP_LEVEL)}"


def test_no_formatter_escapes_in_the_package():
    packed = [str(p) for p in MODULES.values() if "fmt: skip" in p.read_text()]
    assert not packed, f"'# fmt: skip' in {packed}: let the formatter lay the code out"


def test_no_module_imports_the_package_root():
    offenders = {m for m in MODULES if m != "bayes_fusion" and "bayes_fusion" in _imports(m)}
    assert not offenders, f"import the package __init__ (upwards): {sorted(offenders)}"


@pytest.mark.parametrize("package", IMPORT_FREE_PACKAGES)
def test_subpackage_inits_import_nothing(package):
    tree = ast.parse(MODULES[package].read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not imports, f"{package}/__init__.py imports; import from its modules instead"


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
    node = ast.parse("from ..result import FitResult").body[0]
    loop = MODULES["bayes_fusion.infer.svi.loop"]
    assert _resolve("bayes_fusion.infer.svi.loop", loop, node) == ["bayes_fusion.infer.result"]
