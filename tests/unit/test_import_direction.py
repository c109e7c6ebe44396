"""One import direction between the library and data_tools (issue 12).

data_tools may use the library's data layer only (tf4ctr_dist.data.{errors, manifest, storage,
tokens, validate}: the dataset format it writes and the value -> token rules serving shares) and
tf4ctr_dist.progress (the progress lines' pacing and wording, standard library only); the library never imports data_tools, except in the
front door (tf4ctr_dist/cli/), which offers `tf4ctr prepare|check`. Checked on the source (ast),
so a lazy import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ROOT / "tf4ctr_dist"
FRONT_DOOR = LIBRARY / "cli"
DATA_TOOLS = ROOT / "data_tools"
ALLOWED_FROM_LIBRARY = {f"tf4ctr_dist.data.{name}" for name in ("errors", "manifest", "storage", "tokens", "validate")} | {
    "tf4ctr_dist.progress"
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file, including `from X import Y`
    (as X.Y, since Y may be a module) and importlib.import_module / __import__ of a literal."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: stays inside its own package
                continue
            module = node.module or ""
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def _is_under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def test_library_never_imports_data_tools() -> None:
    files = [p for p in _files(LIBRARY) if FRONT_DOOR not in p.parents]
    assert len(files) > 20  # the walk found the library
    offenders = [
        f"{p.relative_to(ROOT)}:{line}: {module}"
        for p in files
        for line, module in imported_modules(p)
        if _is_under(module, "data_tools")
    ]
    assert not offenders, "tf4ctr_dist (outside tf4ctr_dist/cli/) imports data_tools:\n" + "\n".join(offenders)


def test_data_tools_uses_only_the_data_layer() -> None:
    files = _files(DATA_TOOLS)
    assert len(files) > 10
    offenders = []
    for p in files:
        for line, module in imported_modules(p):
            if not _is_under(module, "tf4ctr_dist"):
                continue
            # `from tf4ctr_dist.data.manifest import Manifest` is recorded as ...manifest.Manifest
            if not any(_is_under(module, allowed) for allowed in ALLOWED_FROM_LIBRARY):
                offenders.append(f"{p.relative_to(ROOT)}:{line}: {module}")
    assert not offenders, (
        f"data_tools may import only {sorted(ALLOWED_FROM_LIBRARY)} from the library:\n" + "\n".join(offenders)
    )


@pytest.mark.parametrize(
    "source, module",
    [
        ("import data_tools.cli\n", "data_tools.cli"),
        ("def f():\n    from data_tools.synthetic import generate_synthetic\n", "data_tools.synthetic.generate_synthetic"),
        ("from data_tools import vocab\n", "data_tools.vocab"),
        ("import importlib\nimportlib.import_module('data_tools.engine')\n", "data_tools.engine"),
        ("import tf4ctr_dist\n", "tf4ctr_dist"),
    ],
)
def test_the_scanner_sees_every_import_form(tmp_path: Path, source: str, module: str) -> None:
    path = tmp_path / "m.py"
    path.write_text(source)
    assert module in [m for _, m in imported_modules(path)]
