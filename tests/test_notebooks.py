"""Each notebook runs top to bottom on CPU with the preset of the tiny fixture folders, and is ready for Colab as it
stands: one install cell with the repository URL in one variable, presets per model with the memory each needs, a
device check before loading, outputs cleared."""

import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
REAL_MODELS = {"flux_compression": {"black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-schnell"},
               "own_jax_code": {"black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-schnell"},
               "sd3": {"stabilityai/stable-diffusion-3.5-large", "stabilityai/stable-diffusion-3.5-medium"}}


def code_cells(book):
    return [c for c in book.cells if c.cell_type == "code"]


def test_every_notebook_has_a_parameters_cell():
    assert {p.stem for p in NOTEBOOKS} == set(REAL_MODELS)
    for path in NOTEBOOKS:
        book = nbformat.read(path, as_version=4)
        tagged = [c for c in book.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1 and "PRESET = " in tagged[0].source and "PRESETS = {" in tagged[0].source, path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_colab_ready_as_it_stands(path):
    book = nbformat.read(path, as_version=4)
    cells = code_cells(book)
    assert all(not c.outputs and c.execution_count is None for c in cells), "outputs must be cleared"
    install = cells[0].source
    assert len(re.findall(r'^REPO_URL = "https://', install, re.M)) == 1 and install.count("REPO_URL") >= 2
    assert 'git+{REPO_URL}' in install and '"-e"' not in install  # a plain install: no restart needed
    assert "jax[cuda12]==0.11.2" in install and 'find_spec("ditfa_jax") is None' in install
    assert not any("git clone" in c.source for c in cells)
    params = next(c.source for c in cells if "parameters" in c.metadata.get("tags", []))
    for repo_id in REAL_MODELS[path.stem]:  # each real preset names its repo id and the memory it needs
        line = next((ln for ln in params.splitlines() if f'"{repo_id}"' in ln), None)
        assert line is not None, repo_id
        entry = params[params.index(line):].split("),", 1)[0]
        assert re.search(r"gpu_gb=[1-9]\d*", entry) and "size=1024" in entry and "max_sequence_length=" in entry
        assert "delta=" in entry or "no delta" in params
    assert "parameters x 2 bytes" in params  # how the memory was estimated
    load = next(i for i, c in enumerate(cells) if "from_pretrained(CHECKPOINT" in c.source)
    assert any("check_fits(" in c.source for c in cells[:load]), "the device is checked before the model loads"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    # the kernel inherits these: the tiny preset, fixtures found, this checkout's code imported, outputs in tmp_path
    monkeypatch.setenv("DITFA_PRESET", "tiny")
    monkeypatch.setenv("DITFA_REPO", str(ROOT))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    book = nbformat.read(path, as_version=4)
    NotebookClient(book, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    printed = "".join(o.get("text", "") for c in code_cells(book) for o in c.get("outputs", []))
    assert "tiny is small enough for any device" in printed  # the device check ran, with the tiny preset
