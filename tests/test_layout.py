"""The package's architecture: imports point one way (no cycles, also through function-level imports), and the
layers below never import the ones above."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "transfertune"
# lowest first: a module may import its own layer and the ones listed before it
LAYERS = ["io", "core", "vocab", "training", "inference", "labels", "evaluation", "serving", "cli", "family"]
TOP_LEVEL = {"__init__", "__main__", "demo", "label_demo", "lm_eval_adapter"}  # the package's front door and
# the deprecated `-m` spellings


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every transfertune module `path` imports anywhere in its body (TYPE_CHECKING blocks left out)."""
    tree = ast.parse(path.read_text())
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for n in ast.walk(node))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.startswith("transfertune"):
            found.add(node.module)
            for alias in node.names:  # `from transfertune.serving import app` imports a module
                if (PACKAGE.parent / node.module.replace(".", "/") / f"{alias.name}.py").exists():
                    found.add(f"{node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("transfertune"))
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import (the package uses absolute ones)")
        elif isinstance(node, ast.Call) and ast.unparse(node.func).endswith("import_module") and node.args \
                and isinstance(node.args[0], ast.JoinedStr):
            pass  # the lazy `__getattr__` exports; checked by test_public_names
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        targets = set()
        for imported in imports_of(path):
            while imported not in modules and "." in imported:
                imported = imported.rsplit(".", 1)[0]
            if imported in modules and imported != name and imported != "transfertune":
                targets.add(imported)
        edges[name] = targets
    return edges


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_no_import_cycles():
    edges = graph()
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_layers_point_down():
    wrong = []
    for module, targets in graph().items():
        here = layer_of(module)
        if here is None:
            assert module.split(".")[-1] in TOP_LEVEL or module == "transfertune", f"{module}: outside every layer"
            continue
        for target in targets:
            there = layer_of(target)
            if there is None or LAYERS.index(there) > LAYERS.index(here):
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_public_names():
    import transfertune

    for name in transfertune.__all__:
        assert getattr(transfertune, name) is not None


def test_ruff_is_clean():
    """The lint configuration in pyproject.toml holds for the whole repository."""
    import shutil
    import subprocess
    import sys

    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    res = subprocess.run([ruff, "check", "--no-cache", str(PACKAGE.parents[1])], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:]
