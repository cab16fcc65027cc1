"""Folders follow the torch boundary: no runtime module (edgevlm/) imports torch, transformers, the export
toolchain or the training code, at module level or deferred inside a function. Arrows point one way: CLI ->
train/export -> runtime (DESIGN.md, The parts)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ROOT / "edgevlm"
FORBIDDEN = ("torch", "transformers", "edgevlm.export", "edgevlm.train")
# Entry points, which reach train and export on purpose, and the PyTorch reference backend (used only when
# torch is installed).
ENTRY_POINTS = {"cli.py", "demo/__main__.py", "backends/torch_ref.py"}
# Imports still to move out, each named so that nothing new slips in (none left).
PENDING: set[tuple[str, str]] = set()


def _package(module: str, is_package: bool) -> list[str]:
    parts = module.split(".")
    return parts if is_package else parts[:-1]


def _absolute(name: str, level: int, package: list[str]) -> str:
    if not level:
        return name
    base = package[:len(package) - level + 1]
    return ".".join([*base, name] if name else base)


def imported_names(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module an import in `source` may name: `import x`, `from x import y` (x and x.y, relative ones
    made absolute), and importlib.import_module / __import__ with a literal string, wherever they sit."""
    package = _package(module, is_package)
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module or "", node.level, package)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in ("import_module", "__import__"):
                text = node.args[0].value
                level = len(text) - len(text.lstrip("."))
                names.add(_absolute(text[level:], level, package))
    return names


def forbidden(names: set[str]) -> set[str]:
    return {n for n in names if any(n == f or n.startswith(f + ".") for f in FORBIDDEN)}


def _runtime_modules():
    for path in sorted(RUNTIME.rglob("*.py")):
        rel = path.relative_to(RUNTIME).as_posix()
        parts = ["edgevlm", *path.relative_to(RUNTIME).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_package else parts)
        yield rel, module, is_package, path


def test_no_runtime_module_imports_torch_transformers_export_or_train():
    found = set()
    for rel, module, is_package, path in _runtime_modules():
        if rel in ENTRY_POINTS:
            continue
        found |= {(rel, name) for name in forbidden(imported_names(path.read_text(), module, is_package))}

    def pending(rel, name, entry):
        return rel == entry[0] and (name == entry[1] or name.startswith(entry[1] + "."))

    assert {(rel, name) for rel, name in found if not any(pending(rel, name, e) for e in PENDING)} == set()
    assert {e for e in PENDING if not any(pending(*f, e) for f in found)} == set()  # moved out: drop it here


@pytest.mark.parametrize("source", [
    "import torch",
    "import transformers.models.qwen3",
    "from torch import nn",
    "def f():\n    from transformers import AutoTokenizer",
    "class A:\n    def f(self):\n        import edgevlm.train.tune",
    "from edgevlm import export",
    "from edgevlm.export.exporter import export_bundle",
    "from .. import train",
    "from ..export import gguf",
    "from ..train.tiny import make_tiny",
    "import importlib\nimportlib.import_module('edgevlm.train.demo')",
    "from importlib import import_module\nimport_module('torch')",
    "import_module('..export', __package__)",
    "__import__('transformers')",
])
def test_the_scan_finds_every_kind_of_import(source):
    assert forbidden(imported_names(source, "edgevlm.families.x"))


@pytest.mark.parametrize("source", [
    "import numpy\nfrom PIL import Image",
    "from edgevlm import demo, pipeline",
    "from .. import bundle",
    "from .torch_like import x",
    "import torchvision_free_name_is_not_torch",
    "from edgevlm.exporter import x",
])
def test_the_scan_passes_runtime_imports(source):
    assert not forbidden(imported_names(source, "edgevlm.families.x"))


def test_importing_every_runtime_module_loads_no_torch_transformers_export_or_train():
    modules = [m for rel, m, _, _ in _runtime_modules()
               if rel not in ENTRY_POINTS - {"cli.py"} and not m.endswith("__main__")]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers') "
        "or m.startswith(('edgevlm.export', 'edgevlm.train')))\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


MAX_FUNCTION_LINES = 60  # a runtime function fits a screen: from its `def` to its last line


def test_no_runtime_function_is_longer_than_a_screen():
    long = []
    for rel, _, _, path in _runtime_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{rel}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []
