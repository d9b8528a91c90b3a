"""The package keeps its shape: no import cycle, no module over 400 lines (tests/shape.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("countercache_shape", Path(__file__).with_name("shape.py"))
shape = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(shape)  # type: ignore[union-attr]


def test_no_import_cycles() -> None:
    assert shape.cycles(shape.imports(shape.modules())) == []


def test_modules_at_most_400_lines() -> None:
    too_long = [f"{name} ({lines} lines)" for lines, name in shape.sizes(shape.modules()) if lines > shape.MAX_LINES]
    assert not too_long, "modules over 400 lines: " + ", ".join(too_long)
