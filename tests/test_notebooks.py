"""Every notebook runs top to bottom in a fresh python3 kernel, and is what build.py writes.

Without a GPU the notebooks check rung 1 in Numba's CUDA simulator (conftest.py has set
NUMBA_ENABLE_CUDASIM, which the kernel inherits), skip the CUDA rungs' live checks, and
show stored results instead of measuring; any error in any cell fails the test.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
CELL_TIMEOUT_S = 300  # generous: a cold Numba import on a slow CI runner is most of a minute


def _build_module():
    """notebooks/build.py, loaded under its own name (pypa's `build` may be installed)."""
    spec = importlib.util.spec_from_file_location("notebooks_build", NOTEBOOKS / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_chapter_has_a_notebook_and_it_is_up_to_date():
    build = _build_module()
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(build.NOTEBOOKS)
    for stem, chapter in build.NOTEBOOKS.items():
        committed = nbformat.read(NOTEBOOKS / f"{stem}.ipynb", as_version=4)
        fresh = build.build(stem, chapter())
        assert [c.source for c in committed.cells] == [c.source for c in fresh.cells], (
            f"{stem}.ipynb differs from notebooks/build.py: run `python notebooks/build.py`"
        )


def test_every_source_listing_names_a_region_that_exists():
    """nb.show_source prints a placeholder for a missing region, so a renamed function
    would leave a chapter showing no code without any cell failing."""
    import ast
    import re

    from steps.harness.notebook_support import source_region

    build = _build_module()
    listings = [
        ast.literal_eval(f"({args},)")
        for chapter in build.NOTEBOOKS.values()
        for kind, source in chapter()
        if kind == "code"
        for args in re.findall(r"nb\.show_source\(([^)]*)\)", source)
    ]
    assert listings
    missing = [args for args in listings if source_region(*args) is None]
    assert not missing, f"source regions not found: {missing}"


def test_every_rung_chapter_predicts_then_measures_then_explains():
    build = _build_module()
    for stem in [s for s in build.NOTEBOOKS if s[:2] in {f"{i:02d}" for i in range(1, 8)}]:
        headings = [src.splitlines()[0] for kind, src in build.NOTEBOOKS[stem]() if kind == "markdown"]
        order = [headings.index(h) for h in ("## Prediction", "## Measured", "## Explanation")]
        assert order == sorted(order), f"{stem}: prediction, measurement and explanation out of order"


def test_stored_measurements_and_profile_rows():
    from steps.harness.notebook_support import ncu_rows, stored_by_batch

    assert stored_by_batch("no_such_rung") == {}
    assert "No stored Nsight Compute profile" in ncu_rows("no_such_rung").text
    rows = stored_by_batch("s6_marlin", "llama-7b")
    if rows:  # the committed H100 results: the Llama-2-7B preset is summed over its layers
        assert {r["shape"] for r in rows.values()} == {"sum"}


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.stem)
def test_notebook_runs(path, monkeypatch):
    # The kernel must import this checkout's `reference` and `steps`, installed or not.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
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


def test_keep_outputs_keeps_them_only_where_the_code_is_unchanged():
    build = _build_module()
    old = build.build("x", [("markdown", "# a"), ("code", "x = 1  # one"), ("code", "print(x)")])
    for cell, text in zip([c for c in old.cells if c.cell_type == "code"], ("", "1\n")):
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=text or "x")]
    fresh = build.build("x", [("markdown", "# b"), ("code", "x = 1  # the number one"), ("code", "print(x + 1)")])
    build.keep_outputs(fresh, old)
    kept = [c.outputs for c in fresh.cells if c.cell_type == "code"]
    assert kept[0] and kept[0][0]["text"] == "x"  # only a comment changed
    assert kept[1] == []  # the code changed: its old output would be stale
