"""The Colab notebooks run top to bottom in smoke mode (tiny random checkpoints, CPU), and the
versions they pin are the ones this test environment has."""
import importlib.metadata
import re

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import ROOT

NOTEBOOKS = ROOT / "notebooks"


def _execute(name: str, timeout: int = 900):
    """Runs notebooks/<name> with `SMOKE = True` injected after its parameters cell (as
    papermill does); returns the executed notebook."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "one cell tagged `parameters`"
    assert re.search(r"^SMOKE = False", nb.cells[tagged[0]].source, re.M)
    nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(
        "SMOKE = True", metadata={"tags": ["injected-parameters"]}))
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    return nb


def _text(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", ""))
            data = o.get("data", {})
            out += [data.get(k, "") for k in ("text/plain", "text/html", "text/markdown")]
    return "\n".join(out)


@pytest.mark.parametrize("name", ["blip2_inference.ipynb", "blip2_miniature_training.ipynb"])
def test_pinned_versions_are_the_tested_ones(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    pins = dict(re.findall(r'"([A-Za-z0-9_.-]+)(?:\[[a-z]+\])?==([0-9][^"]*)"', source))
    assert {"jax", "flax", "optax", "orbax-checkpoint", "transformers"} <= set(pins)
    for package, version in pins.items():
        assert importlib.metadata.version(package) == version, package


@pytest.mark.slow
def test_inference_notebook_runs():
    nb = _execute("blip2_inference.ipynb")
    text = _text(nb)
    assert "caption</b>:" in text and "<b>A</b>:" in text
    assert "rank 1, score" in text and "ITM probability" in text
    assert "frozen towers: int8" in text  # smoke mode runs the quantized path
    assert not any(o.get("output_type") == "error" for c in nb.cells for o in c.get("outputs", []))


@pytest.mark.slow
def test_miniature_training_notebook_runs(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")  # the kernel's devices
    nb = _execute("blip2_miniature_training.ipynb")
    text = _text(nb)
    assert "VQA accuracy, every question of each scene (%)" in text and "caption CIDEr" in text
    assert "<b>model</b>:" in text and "(truth:" in text
    m = re.search(r"stage-2 LM loss: ([0-9.]+) at step (\d+), ([0-9.]+) at step (\d+)", text)
    assert m and int(m.group(4)) == int(m.group(2)) + 4
