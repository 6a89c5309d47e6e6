"""The package's layers, held against its imports (every import statement, at module level or inside a
function): no module imports a higher layer, and the import graph has no circle. docs/design.md draws
the same layers; a new module must be placed in LAYERS or this test fails."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mlx_clap"

# Lowest first. A module may import from its own layer or any lower one.
LAYERS: list[tuple[str, ...]] = [
    ("mlx_clap.version", "mlx_clap.settings", "mlx_clap.config", "mlx_clap.dsp", "mlx_clap.extras"),
    ("mlx_clap.io",),
    ("mlx_clap.ops",),
    ("mlx_clap.models",),
    ("mlx_clap.preprocess",),
    ("mlx_clap.convert", "mlx_clap.search", "mlx_clap.store"),
    ("mlx_clap.pipeline",),
    ("mlx_clap.loading",),
    ("mlx_clap.sync",),
    ("mlx_clap.serve",),
    ("mlx_clap.cli",),
]


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int | None:
    """The layer index of a module; None for the package root (it may import anything, lazily)."""
    if module == "mlx_clap":
        return None
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to docs/design.md)")


def imports_of(module: str) -> set[str]:
    """The mlx_clap modules that `module` imports anywhere in its source."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def resolve(name: str) -> str | None:
        # The longest prefix that is a module of ours:
        # `from mlx_clap.ops import kernels` -> mlx_clap.ops.kernels.
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        return name or None

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "mlx_clap":
                    found.add(resolve(alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.split(".")[0] != "mlx_clap":
                continue
            for alias in node.names:
                found.add(resolve(f"{target}.{alias.name}"))
    found.discard(None)
    found.discard(module)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_module_imports_a_higher_layer():
    bad = []
    for module, targets in GRAPH.items():
        mine = layer_of(module)
        if mine is None:
            continue
        for target in sorted(targets):
            theirs = layer_of(target)
            if theirs is None:
                bad.append(f"{module} imports the package root ({target})")
            elif theirs > mine:
                bad.append(f"{module} (layer {mine}) imports {target} (layer {theirs})")
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_import_graph_has_no_circle():
    # Depth-first search for a back edge; reports the circle it finds.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for module in sorted(GRAPH):
        if module not in state:
            circle = visit(module)
            assert circle is None, "import circle: " + " -> ".join(circle)


def test_imports_are_resolved():
    """The checker sees the imports it must judge: from-imports of modules and of names."""
    assert layer_of("mlx_clap.cli.embed") > layer_of("mlx_clap.models.clap")
    assert "mlx_clap.models.htsat" in GRAPH["mlx_clap.models.clap"]  # from-imports are resolved
    assert "mlx_clap.ops.kernels" in GRAPH["mlx_clap.models.htsat"]  # `from pkg import module` too


def test_installed_package_is_only_mlx_clap():
    """pyproject's package list: nothing top-level but mlx_clap (a `convert` package would shadow users')."""
    text = (PACKAGE.parent / "pyproject.toml").read_text()
    assert 'include = ["mlx_clap*"]' in text
    assert not (PACKAGE.parent / "convert" / "__init__.py").exists()


def test_import_has_no_side_effects():
    """`import mlx_clap` (and the CLI module) rebinds no BLAS, tunes no allocator and loads nothing heavy."""
    code = (
        "import sys, mlx_clap, mlx_clap.cli\n"
        "from mlx_clap.ops import blas, malloc\n"
        "assert blas.blas_info()['status'] == 'not set up', blas.blas_info()\n"
        "assert not malloc.malloc_tuned()\n"
        "heavy = [m for m in ('torch', 'transformers', 'mlx_clap.models.htsat', "
        "'mlx_clap.preprocess.features') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print('clean')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "clean" in out.stdout, out.stderr
