"""The shape of the house (issue 21): small files, short functions, layers that only import downwards.
These run in the default test run, so a change that breaks them fails CI, not a reviewer's patience."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "peftcli"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_file_is_over_400_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in sources() if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert long == {}


def function_lengths(path: Path) -> dict[str, int]:
    """Each function's body length in lines, without its docstring (a long docstring is not a long function)."""
    out = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                body = body[1:]
            if body:
                out[f"{path.relative_to(ROOT)}:{node.name}"] = body[-1].end_lineno - body[0].lineno + 1
    return out


def test_no_function_is_over_60_lines() -> None:
    long = {name: n for p in sources() for name, n in function_lengths(p).items() if n > MAX_FUNCTION_LINES}
    assert long == {}


def test_folders_are_at_most_two_levels_deep() -> None:
    deep = [str(p.relative_to(ROOT)) for p in sources() if len(p.relative_to(PACKAGE).parts) > 3]
    assert deep == []


@pytest.mark.skipif(
    shutil.which("lint-imports", path=str(Path(sys.executable).parent)) is None, reason="import-linter is a test extra"
)
def test_imports_follow_the_layers() -> None:
    """.importlinter: cli -> commands -> training -> reporting -> models -> data -> config -> methods | tasks ->
    adapter_io -> errors, and no command imports another."""
    tool = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    done = subprocess.run([tool, "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "0 broken" in done.stdout
