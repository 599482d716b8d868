"""The notebooks run top to bottom (offline, on CPU)."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    # β = 0 on orthogonal gradients of norms 1 and 2 gives MGDA's λ = (0.8, 0.2)
    assert re.search(r"^0\.0 \[0\.8\d*, 0\.(2|19)\d*\]$", outputs, re.M), outputs[:500]
    assert re.search(r"^2 \d\.\d+ \d\.\d+$", outputs, re.M)  # the last round's eval rewards were printed
    if path.name == "quickstart.ipynb":
        figures = [
            o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})
        ]
        assert len(figures) == 2  # rewards/λ/drift, and the front
        assert len(re.findall(r"^p = \[0\.\d, 0\.\d\] → \[\d\.\d+, \d\.\d+\]$", outputs, re.M)) == 3
        assert outputs.count("response: ") == 2 and outputs.count("a_to_m=") >= 2
