"""The documentation: the site builds with ``mkdocs build --strict``, and the example notebook runs and finds the
planted objects.

Needs mkdocs (the site) and nbclient, nbformat and ipykernel (the notebook), from the dev extra.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "example.ipynb"
RECALL_LINE = re.compile(r"^recall (\d+(?:\.\d+)?)$", re.MULTILINE)


def test_site_builds_strictly(tmp_path: Path) -> None:
    """Every page in the nav exists, every link and anchor resolves, and no page is left out of the nav."""
    site = tmp_path / "site"
    completed = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    if completed.returncode != 0:
        pytest.fail(f"mkdocs build --strict failed ({completed.returncode}):\n{completed.stdout}{completed.stderr}")
    for page in ("index", "quickstart", "concepts", "service", "configuration", "benchmarks", "example"):
        assert (site / f"{page}.html").is_file(), f"{page}.html missing from the site"
    assert (site / "example.ipynb").is_file(), "the notebook is not copied into the site for download"


def test_notebook_is_saved_without_outputs() -> None:
    """The notebook in the repository carries no outputs, so it diffs cleanly and never shows stale results."""
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"cell {cell.id} has saved outputs"


def test_example_notebook_runs_and_finds_the_planted_objects(tmp_path: Path) -> None:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(tmp_path)}}
    )
    try:
        client.execute()
    except CellExecutionError as error:
        pytest.fail(f"a cell of {NOTEBOOK.name} raised:\n{error}")
    errors = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs
              if out.output_type == "error"]
    assert not errors, errors
    scoring = [cell for cell in notebook.cells if "score" in cell.metadata.get("tags", [])]
    assert len(scoring) == 1, "exactly one cell is tagged 'score'"
    text = "".join(out.get("text", "") for out in scoring[0].outputs if out.output_type == "stream")
    found = RECALL_LINE.search(text)
    assert found, f"no 'recall N' line in the scoring cell's output: {text!r}"
    assert float(found.group(1)) >= 0.9, text
    assert not list(tmp_path.iterdir()), "the notebook left files in its working directory"
