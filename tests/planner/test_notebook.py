"""notebooks/plan_search.ipynb runs top to bottom (executed with nbclient when it is installed)."""
from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "plan_search.ipynb"


def test_plan_search_notebook_executes(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("plans explored" in o.get("text", "") for o in outputs)
    # the Pareto front, the timeline and the memory bars are drawn inline
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3
