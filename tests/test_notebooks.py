"""Cheap checks of every notebook before nbmake spends minutes on it."""

import ast

import nbformat
import pytest

from tinymim.runner import NOTEBOOKS_DIR, list_notebooks

NOTEBOOKS = list_notebooks(NOTEBOOKS_DIR)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_code_cell_parses_and_outputs_are_stripped(path):
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            ast.parse(cell.source, filename=f"{path.name} cell {i}")
            assert not cell.outputs and cell.execution_count is None, f"{path.name} cell {i} has outputs"
    assert sum("parameters" in c.metadata.get("tags", []) for c in nb.cells) == 1


def test_the_notebooks_are_numbered_in_pipeline_order():
    assert [p.stem for p in NOTEBOOKS] == ["01_models", "02_distill_pretrain", "03_finetune", "04_segmentation",
                                           "05_robustness", "06_explore", "07_report", "08_ablations"]
