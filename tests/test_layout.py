"""The package as installed: one top-level name, layering by import rules, no import cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# installed name -> folder in the repository (pyproject.toml's package-dir)
PACKAGES = {
    "vitslim": ROOT / "vitslim",
    "vitslim.pruning": ROOT / "pruning",
    "vitslim.export": ROOT / "export",
    "vitslim.deploy": ROOT / "deploy",
}
CORE = "vitslim.core"  # what every layer may import; it imports nothing else of vitslim
# what each layer may import from vitslim, at module level or inside functions (the core: always)
ALLOWED = {
    "vitslim.core": (),
    "vitslim.pruning": ("vitslim.pruning",),
    "vitslim.export": ("vitslim.export", "vitslim.pruning"),
    "vitslim.deploy": ("vitslim.deploy",),
}


def layer_of(module: str) -> str:
    """The layer a vitslim module belongs to: one of ALLOWED, or 'app' (the API, CLI, pipeline...)."""
    return next((layer for layer in ALLOWED if module == layer or module.startswith(layer + ".")), "app")


def module_files() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def imported_modules(name: str, path: Path, top_level_only: bool) -> set[str]:
    """vitslim modules imported by module `name` (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found if m == "vitslim" or m.startswith("vitslim.")}


def test_layers_import_only_the_core_and_the_layers_below_them():
    modules = module_files()
    problems = []
    for name, path in modules.items():
        layer = layer_of(name)
        if layer == "app":
            continue
        for imported in imported_modules(name, path, top_level_only=False):
            if imported in modules and layer_of(imported) != CORE and not imported.startswith(ALLOWED[layer]):
                problems.append(f"{name} imports {imported}")
    assert not problems, problems


def test_every_vitslim_import_names_a_module_that_exists():
    """Imports inside functions run only when the function does: a stale one (a module that moved)
    would fail in a user's command, not at import time."""
    modules = module_files()
    missing = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                if base.startswith("vitslim") and base not in modules:
                    missing.append(f"{name}: from {base} import ...")
            elif isinstance(node, ast.Import):
                missing += [
                    f"{name}: import {alias.name}"
                    for alias in node.names
                    if alias.name.startswith("vitslim") and alias.name not in modules
                ]
    assert not missing, missing


def test_nothing_below_the_app_layer_imports_it():
    modules = module_files()
    app = {name for name in modules if layer_of(name) == "app"} - {"vitslim"}  # the package itself: lazy, light
    problems = [
        f"{name} imports {imported}"
        for name, path in modules.items()
        if layer_of(name) != "app"
        for imported in imported_modules(name, path, top_level_only=False)
        if imported in app
    ]
    assert not problems, problems
    assert {"vitslim.cli", "vitslim.api", "vitslim.pipeline", "vitslim.recipe"} <= app


def test_no_import_cycles():
    modules = module_files()
    graph = {
        name: {m for m in imported_modules(name, path, top_level_only=True) if m in modules and m != name}
        for name, path in modules.items()
    }
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt) :] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)


BLOCKER = """
import importlib.abc, sys
BLOCKED = ("timm", "vitslim.pruning", "vitslim.export")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith(BLOCKED):
            raise ImportError(f"blocked: {fullname}")
sys.meta_path.insert(0, Block())
import pkgutil, vitslim.deploy
names = [m.name for m in pkgutil.iter_modules(vitslim.deploy.__path__, "vitslim.deploy.")]
for name in names:
    __import__(name)
heavy = sorted(m for m in ("torch", "onnx", "onnxruntime", "tensorrt", "tensorrt_rtx", "timm") if m in sys.modules)
print(len(names), heavy)
"""


def test_deploy_imports_without_timm_pruning_or_export():
    completed = subprocess.run([sys.executable, "-c", BLOCKER], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    count, heavy = completed.stdout.split(" ", 1)
    assert int(count) >= 6 and heavy.strip() == "[]", completed.stdout


def test_import_vitslim_is_light_and_the_api_is_complete():
    code = (
        "import sys, vitslim; print(sorted(m for m in ('torch', 'timm', 'onnx') if m in sys.modules)); "
        "print(' '.join(name for name in vitslim.__all__ if getattr(vitslim, name) is not None))"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    light, names = completed.stdout.splitlines()
    assert light == "[]"
    assert {
        "load_model",
        "load_data",
        "list_methods",
        "prune",
        "save_run",
        "load_run",
        "compact",
        "export_onnx",
        "build_engine",
        "compare",
        "benchmark",
        "gate",
        "TorchRunner",
        "OnnxRuntimeRunner",
        "TensorRTRunner",
        "VitslimError",
    } <= set(names.split())


@pytest.mark.slow
def test_wheel_holds_only_the_vitslim_package(tmp_path):
    """Build the wheel from a copy of the sources (so the checkout stays clean) and read its names."""
    source = tmp_path / "src"
    files = subprocess.run(
        ["git", "ls-files", "pyproject.toml", "README.md", "vitslim", "pruning", "export", "deploy"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in files:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes((ROOT / name).read_bytes())
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--quiet",
        "-w",
        str(tmp_path / "dist"),
        str(source),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("vitslim-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        assert archive.read(top_level).decode().split() == ["vitslim"]
    assert {n.split("/")[0] for n in names if not n.startswith("vitslim-")} == {"vitslim"}
    assert {
        "vitslim/core/errors.py",
        "vitslim/pruning/plan.py",
        "vitslim/pruning/methods/vtp.py",
        "vitslim/export/passes/__init__.py",
        "vitslim/deploy/runners/base.py",
    } <= set(names)


def test_the_package_never_imports_the_benchmarks():
    """benchmarks/ imports vitslim (it measures it); vitslim must work without it (it is not installed)."""
    offenders = []
    for name, path in module_files().items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            offenders += [f"{name} imports {n}" for n in names if n == "benchmarks" or n.startswith("benchmarks.")]
    assert not offenders, offenders
