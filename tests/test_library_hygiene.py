"""The library must stay importable without the WebUI and must not talk to the console behind the
caller's back: no host imports, no print/exit outside the CLI entry points, no assert as validation."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lib_sdcustom"
CONSOLE_ENTRY_POINTS = {"cli.py", "__main__.py"}
#: The one host adapter may import the WebUI, but only inside functions, so importing it needs no WebUI.


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _is_main_guard(node: ast.AST) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def _library_nodes(tree: ast.Module):
    """Every node except those under `if __name__ == "__main__":`, where a script may exit."""
    for top in tree.body:
        if not _is_main_guard(top):
            yield from ast.walk(top)


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_host_imports_prints_exits_or_asserts(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    problems = []
    for node in _library_nodes(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            names = []
        problems += [f"line {node.lineno}: imports host module {name}" for name in names
                     if name == "modules" or name.startswith("modules.")]
        if isinstance(node, ast.Assert):
            problems.append(f"line {node.lineno}: assert (use a UserFacingError or ValueError)")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and path.name not in CONSOLE_ENTRY_POINTS:
            if node.func.id in {"print", "exit", "quit"}:
                problems.append(f"line {node.lineno}: {node.func.id}()")
        if isinstance(node, ast.Attribute) and node.attr == "exit" and isinstance(node.value, ast.Name) \
                and node.value.id == "sys" and path.name != "__main__.py":
            problems.append(f"line {node.lineno}: sys.exit")
    assert not problems, f"{path.relative_to(PACKAGE)}: " + "; ".join(problems)


def _layout_entries() -> set[str]:
    """The names in the first column of README.md's Layout table."""
    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    return {name for cell in rows for name in re.findall(r"`([^`]+)`", cell)}


def test_readme_layout_lists_every_package_and_module() -> None:
    on_disk = {f"{path.name}/" if path.is_dir() else path.name for path in PACKAGE.iterdir()
               if path.name != "__init__.py" and path.name != "__pycache__"
               and (path.suffix == ".py" or (path / "__init__.py").is_file())}
    assert _layout_entries() == on_disk
