"""The tutorial notebooks run top to bottom (CPU, kernel "python3" from this venv).

To add a notebook, add its file name to NOTEBOOKS, with the environment that shortens it.
"""

from __future__ import annotations

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = {
    "01_mnist_twinflow.ipynb": {"TWINFLOW_NB_STEPS": "20", "TWINFLOW_NB_FT_STEPS": "3"},  # short runs
    "02_twinflow_in_diffusers.ipynb": {},
}
# Numbers a notebook's text states, each with what its own output prints for it.
STATED = {
    "01_mnist_twinflow.ipynb": [("≈0.43M parameters", "0.43M parameters"),
                                ("1500 steps of batch 128", "1500 steps, 192000 images")],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path, monkeypatch):
    for key, value in NOTEBOOKS[name].items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"
    # Run from a scratch folder so that files a notebook writes stay out of the tree.
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    # What a reader sees: every cell that draws a figure shows it as an image.
    for i, c in enumerate(nb.cells):
        if c.cell_type == "code" and ("plt.show()" in c.source or "show(" in c.source):
            assert any("image/png" in o.get("data", {}) for o in c.outputs), f"cell {i} shows no figure"
    # Every number the text states is one the notebook prints.
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    printed = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    for stated, shown in STATED.get(name, []):
        assert stated in text and shown in printed, (stated, shown)


def test_the_headless_command_notebooks_readme_names_is_installed():
    """notebooks/README.md tells a reader without JupyterLab to run `jupyter execute` from the
    venv .ci/install makes: that command must exist there (nbclient brings it)."""
    import os
    import re
    import subprocess
    import sys

    readme = (NOTEBOOK_DIR / "README.md").read_text()
    commands = re.findall(r"jupyter (\w+) notebooks/(\S+\.ipynb)", readme)
    assert commands, "notebooks/README.md names no `jupyter <command> notebooks/<file>`"
    jupyter = pathlib.Path(sys.executable).parent / "jupyter"
    for sub, notebook in commands:
        assert (NOTEBOOK_DIR / notebook).is_file(), notebook
        r = subprocess.run([str(jupyter), sub, "--help"], capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, PYDEVD_DISABLE_FILE_VALIDATION="1"))
        assert r.returncode == 0, f"`jupyter {sub}` is not available in this venv:\n{r.stderr[-1500:]}"
