"""The quickstart notebook executes top to bottom against the embedded default."""

from __future__ import annotations

import tempfile
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.ray_support import REPO_ROOT

pytestmark = pytest.mark.slow

NOTEBOOK = Path(REPO_ROOT) / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs_clean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel inherits this environment: its own database file and Ray directory.
    monkeypatch.setenv("TASKRAY_DATABASE_URL", f"sqlite:///{tmp_path / 'notebook.db'}")
    monkeypatch.setenv("RAY_TMPDIR", tempfile.mkdtemp(prefix="trn-"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook,
        timeout=180,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(
        str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) for o in outputs
    )
    word_count_cell = next(c for c in notebook.cells if "the quick brown fox" in c.source)
    [result] = [o for o in word_count_cell.outputs if o.output_type == "execute_result"]
    assert result["data"]["text/plain"] == "9"
    assert "CUDA_VISIBLE_DEVICES=0" in text
    assert "2470" in text  # sum of squares below 20
    assert "dead" in text
    html = "\n".join(str(o.get("data", {}).get("text/html", "")) for o in outputs)
    assert "<table>" in html and "succeeded" in html
