"""Every chapter is a jupytext source, notebooks/NN_name.py (py:percent), paired with a
notebook NN_name.ipynb that keeps the outputs of its last GPU run: the two hold the same
cells, and every chapter runs top to bottom in a fresh python3 kernel.

The chapters are whatever sources notebooks/ holds, so a new chapter is tested as soon as
it is there. Without a GPU the notebooks check rung 1 in Numba's CUDA simulator (conftest.py
has set NUMBA_ENABLE_CUDASIM, which the kernel inherits), skip the CUDA rungs' live checks,
and show stored results instead of measuring; any error in any cell fails the test.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
jupytext = pytest.importorskip("jupytext")

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
CHAPTERS = sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.py"))
CELL_TIMEOUT_S = 300  # generous: a cold Numba import on a slow CI runner is most of a minute


def source(stem: str):
    """The chapter as its source says, read by jupytext."""
    return jupytext.read(NOTEBOOKS / f"{stem}.py")


def code_cells(stem: str) -> list[str]:
    return [c.source for c in source(stem).cells if c.cell_type == "code"]


def test_every_chapter_source_is_paired_with_a_notebook_holding_the_same_cells():
    assert CHAPTERS, "no chapter sources in notebooks/"
    from jupytext.config import load_jupytext_config

    assert "ipynb,py:percent" in load_jupytext_config(str(NOTEBOOKS / f"{CHAPTERS[0]}.py")).formats
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == CHAPTERS
    for stem in CHAPTERS:
        paired = nbformat.read(NOTEBOOKS / f"{stem}.ipynb", as_version=4)
        cells = [(c.cell_type, c.source) for c in source(stem).cells]
        assert cells == [(c.cell_type, c.source) for c in paired.cells], (
            f"{stem}.ipynb differs from {stem}.py: run `jupytext --sync notebooks/{stem}.py`"
        )


def test_every_source_listing_names_a_region_that_exists():
    """nb.show_source prints a placeholder for a missing region, so a renamed function
    would leave a chapter showing no code without any cell failing."""
    from steps.harness.notebook_support import source_region

    listings = [
        ast.literal_eval(f"({args},)")
        for stem in CHAPTERS
        for cell in code_cells(stem)
        for args in re.findall(r"nb\.show_source\(([^)]*)\)", cell)
    ]
    assert listings
    missing = [args for args in listings if source_region(*args) is None]
    assert not missing, f"source regions not found: {missing}"


def test_every_rung_chapter_after_the_first_predicts_then_measures_then_explains():
    from steps.registry import STEPS

    rung_chapters = [
        stem for stem in CHAPTERS
        if any(re.search(r'nb\.rung_status\("(\w+)"\)', c) and STEPS[0].name not in c for c in code_cells(stem))
    ]  # fmt: skip
    assert rung_chapters
    for stem in rung_chapters:
        headings = [c.source.splitlines()[0] for c in source(stem).cells if c.cell_type == "markdown"]
        assert {"## Prediction", "## Measured", "## Explanation"} <= set(headings), stem
        order = [headings.index(h) for h in ("## Prediction", "## Measured", "## Explanation")]
        assert order == sorted(order), f"{stem}: prediction, measurement and explanation out of order"


def test_stored_measurements_and_profile_rows():
    from steps.harness.notebook_support import measured, ncu_rows, stored_by_batch, stored_gpus

    assert stored_by_batch("no_such_rung") == {}
    assert "No stored Nsight Compute profile" in ncu_rows("no_such_rung").text
    assert "No stored measurement of `no_such_rung`" in measured("no_such_rung", below="s0_numpy").text
    rows = stored_by_batch("s6_marlin", "llama-7b")
    if rows:  # the committed results: the Llama-2-7B preset is summed over its layers, newest GPU first
        assert {r["shape"] for r in rows.values()} == {"sum"} and {r["gpu"] for r in rows.values()} == {stored_gpus()[0]}
        text = measured("s6_marlin", below="s5_async_pipeline").text
        assert text.index(stored_gpus()[0]) < text.index("| 16 |")


def test_stored_results_show_the_newest_gpu_first(tmp_path, monkeypatch):
    import json

    from steps.harness import notebook_support as nb
    from test_report import row

    rows = [row(rung, us, M=M, gpu=gpu, date=date, preset="ideal", shape="64x64")
            for gpu, date, us in (("Old GPU", "2026-11-01T00:00:00+00:00", 20.0), ("New GPU", "2026-12-01T00:00:00+00:00", 10.0))
            for M in (1, 16, 64) for rung in ("fp16", "s5_async_pipeline", "s6_marlin")]  # fmt: skip
    (tmp_path / "run.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(nb, "RESULTS_DIR", tmp_path)
    assert nb.stored_gpus() == ["New GPU", "Old GPU"]
    assert {r["gpu"] for r in nb.stored_by_batch("s6_marlin").values()} == {"New GPU"}
    assert nb.measured_read_gbps() == (2.0, "New GPU")
    text = nb.measured("s6_marlin", below="s5_async_pipeline").text
    assert text.index("New GPU") < text.index("Old GPU") and "| 16 | 10.0 µs · 10× | 10.0 µs · 10× | 1× |" in text
    assert [gpu for gpu, pictures in nb.stored_pictures()] == ["New GPU", "Old GPU"]
    assert nb.stored_pictures()[0][1][1]._repr_png_().startswith(b"\x89PNG")


@pytest.mark.parametrize("stem", CHAPTERS)
def test_chapter_runs(stem, monkeypatch):
    # The kernel must import this checkout's `reference` and `steps`, installed or not.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    client = nbclient.NotebookClient(
        source(stem), timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, on any error


def test_show_source_selects_whole_functions_and_kernels():
    from steps.harness.notebook_support import show_source, source_region

    first, lines = source_region("steps/s0_numpy.py", "def _run")
    assert lines[0].strip().startswith("def _run") and "out[...]" in lines[-1]
    first, lines = source_region("steps/harness/notebook_support.py", "def source_region")
    assert lines[-1].strip() == "return i + 1, lines[i : j + 1]"  # past a multi-line signature
    first, lines = source_region("csrc/common.cuh", "void mma_m16n8k16")
    assert lines[0].startswith("//") and lines[-1] == "}"  # with its comment, to its closing brace
    assert "not in this checkout yet" in show_source("csrc/no_such_rung.cu", "kernel").text
    assert "not in this checkout yet" in show_source("steps/s0_numpy.py", "def no_such_function").text
