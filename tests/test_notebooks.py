"""Both notebooks run end to end on tiny generated images, as CI runs them (their TINY switch on)."""

from pathlib import Path

import nbformat
import numpy as np
import pytest
from PIL import Image

nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def run_notebook(name: str, cwd: Path, **params) -> nbformat.NotebookNode:
    """Execute a notebook with its parameters cell overridden (a cell inserted after it, as papermill does)."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items())))
    nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    ).execute()
    return nb


def test_notebooks_are_stored_without_outputs():
    for path in NOTEBOOKS.glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} has outputs"


def test_pretrain_then_classifier_notebooks(tmp_path):
    rng = np.random.default_rng(0)
    for c, cls in enumerate(["red", "blue"]):
        for split, n in (("train", 32), ("test", 8)):
            folder = tmp_path / "data" / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                img = (rng.random((16, 16, 3)) * 80).astype(np.uint8)
                img[..., 0 if c == 0 else 2] += 150
                Image.fromarray(img).save(folder / f"{i}.png")
    data = str(tmp_path / "data")
    nb = run_notebook("mae_pretrain.ipynb", tmp_path, TINY=True, DATA=data, RUN_DIR="runs/pre")
    run = tmp_path / "runs" / "pre"
    for name in ("curves.png", "reconstructions.png", "my_reconstructions.png", "model.safetensors"):
        assert (run / name).stat().st_size > 0, name
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # curves, reconstructions, the user's images

    nb = run_notebook("mae_classifier.ipynb", tmp_path, TINY=True, DATA=data, PRETRAINED="runs/pre", RUNS="runs")
    for name in ("notebook-scratch", "notebook-pretrained"):
        assert (tmp_path / "runs" / name / "best.safetensors").exists()
    assert (tmp_path / "runs" / "notebook-compare.png").stat().st_size > 0
    printed = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    assert "scratch: top-1" in printed and "pretrained: top-1" in printed and "on 16 images" in printed
