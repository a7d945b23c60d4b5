"""The layers import only downwards: config ← data, distributed ← models ← components ← trainer, plan
← commands, with errors and tools below everything. Read from the source with ``ast``."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "tetrad"

LAYER = {
    "errors": 0,
    "tools": 0,
    "config": 1,
    "data": 2,
    "distributed": 2,
    "models": 3,
    "components": 4,
    "trainer": 5,
    "plan": 5,  # dry run, memory estimate, layout planner: beside the trainer, not on it
    "commands": 6,  # cli.py, train.py, convert.py, generate.py, evaluate.py
}
COMMANDS = {"cli", "train", "convert", "generate", "evaluate"}


def _part(module: str) -> str:
    """tetrad.models.llama3.model → models; tetrad.cli → commands."""
    part = module.split(".")[1]
    return "commands" if part in COMMANDS else part


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_imports_point_down_the_layers() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        if relative.name == "__init__" and len(relative.parts) == 2:
            continue  # tetrad/__init__.py
        here = _part(".".join(relative.parts))
        for module in (m for m in _imports(path) if m.startswith("tetrad.")):
            there = _part(module)
            same_peer = LAYER[there] == LAYER[here] and there != here
            if LAYER[there] > LAYER[here] or (same_peer and LAYER[here] > 0):
                upward.append(f"{relative} imports {module}")
    assert upward == []


def test_model_code_knows_no_mesh() -> None:
    """DESIGN principle 1: a family's model.py imports nothing from torch.distributed."""
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in sorted(PACKAGE.glob("models/*/model.py"))
        if any(m.startswith("torch.distributed") for m in _imports(path))
    ]
    assert offenders == []
