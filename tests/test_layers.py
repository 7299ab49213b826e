"""The package's layers: imports only go down (cli -> train -> bench -> compat -> nn -> ops).

Read from the source with `ast`, so a lazy import inside a function counts as much as one at the
top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import unetpp_fast

PACKAGE_DIR = Path(unetpp_fast.__file__).resolve().parent
# Lower rank = lower layer. A module may import its own layer and the layers below it.
LAYER_RANK = {"ops": 0, "nn": 1, "compat": 2, "bench": 3, "train": 4, "cli": 5, "__main__": 5}
# The package's public face re-exports every layer; the shim keeps a documented `python -m` path.
FACADES = {"__init__", "kernel_resources"}


def _layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "unetpp_fast" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in LAYER_RANK else None


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _package_of(path: Path) -> list[str]:
    package = _module_name(path).split(".")
    return package if path.name == "__init__.py" else package[:-1]


def _imports(source: str, package: list[str]) -> list[str]:
    """Absolute names of every unetpp_fast module a source imports (relative imports resolved)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found.append(base)
            found += [f"{base}.{alias.name}" for alias in node.names]
    return [name for name in found if name.split(".")[0] == "unetpp_fast"]


def _violations(source: str, path: Path, layer: str) -> list[str]:
    where = path.relative_to(PACKAGE_DIR)
    out = []
    for name in _imports(source, _package_of(path)):
        if name == "unetpp_fast" and layer != "cli":
            out.append(f"{where} imports the package facade 'unetpp_fast'")
            continue
        target = _layer_of(name)
        if target is not None and LAYER_RANK[target] > LAYER_RANK[layer]:
            out.append(f"{where} ({layer}) imports {name} ({target})")
    return out


def _layered_files():
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        rel = path.relative_to(PACKAGE_DIR)
        if len(rel.parts) == 1 and rel.stem in FACADES:
            continue
        layer = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        yield path, layer


def test_every_module_belongs_to_a_layer():
    unknown = [str(p) for p, layer in _layered_files() if layer not in LAYER_RANK]
    assert not unknown, f"modules outside the layers {sorted(LAYER_RANK)}: {unknown}"


def test_imports_only_go_down():
    violations = []
    for path, layer in _layered_files():
        violations += _violations(path.read_text(), path, layer)
    assert not violations, "imports that go up the layers:\n" + "\n".join(violations)


def test_the_checker_sees_upward_imports():
    # The check above must be able to fail: an operator module importing a network (lazily, inside
    # a function, or relatively) is caught.
    path = PACKAGE_DIR / "ops" / "fused_op.py"
    for extra in (
        "from unetpp_fast.nn.unetpp import UNetPlusPlus",
        "def f():\n    from ..train import training",
        "import unetpp_fast.compat.accelerate",
    ):
        assert _violations(path.read_text() + "\n" + extra + "\n", path, "ops"), extra
