"""Notebooks are committed clean and follow the workbook's skeleton."""
import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_stripped(path):
    nb = json.loads(path.read_text())
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert not cell.get("outputs"), f"{path.name} cell {i} has stored outputs (strip them)"
            assert cell.get("execution_count") is None, f"{path.name} cell {i} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_skeleton(path):
    nb = json.loads(path.read_text())
    cells = nb["cells"]
    first = "".join(cells[0]["source"])
    assert cells[0]["cell_type"] == "markdown" and first.startswith("# ") and "\n" not in first.strip()
    params = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1, "exactly one cell tagged `parameters`"
    # the parameters cell holds literals only: NAME = literal
    import ast
    for node in ast.parse("".join(params[0]["source"])).body:
        assert isinstance(node, ast.Assign), "parameters cell: assignments only"
        ast.literal_eval(node.value)
    after = cells[cells.index(params[0]) + 1]
    assert "ci_mode()" in "".join(after["source"]), "the cell after parameters applies CI sizes"
    text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown").lower()
    for section in ("what you will learn", "hypothesis", "why", "interactive", "exercises"):
        assert section in text, f"{path.name} lacks a '{section}' section"
    assert "NBVAL_IGNORE_OUTPUT" in "".join("".join(c["source"]) for c in cells)
