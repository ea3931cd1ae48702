"""The hand-written stub of the private extension must name exactly what the module exports."""

from __future__ import annotations

import ast
from pathlib import Path

from sia_edge import _core


def test_stub_matches_module() -> None:
    tree = ast.parse((Path(__file__).parent.parent / "sia_edge" / "_core.pyi").read_text())
    stub = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    module = {name for name in dir(_core) if not name.startswith("_")}
    assert stub == module
