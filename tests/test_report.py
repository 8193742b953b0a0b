"""The results section is generated from data, regenerating it changes nothing, and its
pictures keep one colour per rung and show the newest GPU first."""

import json

import pytest

from steps.harness import report
from steps.harness.report import END, START, write_report

LADDER = ("s1_numba_naive", "s3_tensor_cores", "s4_marlin_layout", "s6_marlin", "s7_sparse_marlin")


def row(rung, us, M=16, gpu="Test GPU", date="2026-11-25T12:00:00+00:00", preset="llama-7b", shape="sum"):
    return {
        "date": date, "device": "cuda", "gpu": gpu, "sms": 2, "l2_bytes": 1, "versions": {"torch": "x", "cupy": "y"},
        "preset": preset, "shape": shape, "K": 8, "N": 8, "M": M, "group_size": 128, "rung": rung, "us": us,
        "q1_us": us, "q3_us": us, "method": "cuda-graph", "speedup_vs_fp16": 100.0 / us,
        "weight_bytes": 750 if "sparse" in rung else 1000, "weight_gbps": 1.0, "read_bw_gbps": 2.0,
        "pct_of_read_bw": 50.0, "max_error_ratio": 0.1,
    }  # fmt: skip


def fake_rows(gpu="Test GPU", date="2026-11-25T12:00:00+00:00"):
    return [row(rung, us * M, M, gpu, date) for M in (1, 16) for rung, us in (("fp16", 100.0), ("s1_numba_naive", 400.0))]


def write(results, rows):
    results.mkdir(exist_ok=True)
    (results / "run.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_fills_the_readme_section_reproducibly(tmp_path):
    pytest.importorskip("matplotlib")
    results = tmp_path / "results"
    write(results, fake_rows())
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{START}\nold\n{END}\noutro\n")
    write_report(results, readme)
    pictures = [results / f"{name}_Test_GPU.png" for name in ("ladder", "waterfall")]
    first_text, first_pngs = readme.read_text(), [p.read_bytes() for p in pictures]
    assert "old" not in first_text and first_text.startswith("intro") and first_text.endswith("outro\n")
    assert "| s1_numba_naive |" in first_text and "0.25×" in first_text and "floor" in first_text
    assert "(results/ladder_Test_GPU.png)" in first_text and "(results/waterfall_Test_GPU.png)" in first_text
    write_report(results, readme)
    assert readme.read_text() == first_text
    assert [p.read_bytes() for p in pictures] == first_pngs


def test_the_newest_gpu_comes_first_and_the_earlier_ones_after_it(tmp_path):
    pytest.importorskip("matplotlib")
    results = tmp_path / "results"
    # The older GPU was measured again after the newer one joined: it stays second.
    write(results, fake_rows("Old GPU", "2026-11-01T00:00:00+00:00") + fake_rows("New GPU", "2026-12-01T00:00:00+00:00")
          + [row("s6_marlin", 30.0, gpu="Old GPU", date="2026-12-02T00:00:00+00:00")])  # fmt: skip
    readme = tmp_path / "README.md"
    readme.write_text(f"{START}\n{END}\n")
    write_report(results, readme)
    text = readme.read_text()
    order = [text.index(s) for s in ("### New GPU", "waterfall_New_GPU.png", "### Earlier GPUs", "#### Old GPU", "waterfall_Old_GPU.png")]
    assert order == sorted(order)
    assert all((results / f"{name}_{gpu}.png").is_file() for name in ("ladder", "waterfall") for gpu in ("New_GPU", "Old_GPU"))
    page = (results / "README.md").read_text()
    assert page.index("## New GPU") < page.index("## Earlier GPUs") < page.index("### Old GPU")


def test_every_rung_has_its_own_colour_in_every_plot():
    pytest.importorskip("matplotlib")
    from steps.registry import STEPS

    names = sorted({"fp16", *(s.name for s in STEPS)})
    assert len({report.rung_colour(n) for n in names}) == len(names)
    assert report.rung_colour("some_peer") == report.rung_colour("some_peer")
    # The same rung is drawn in the same colour whichever rungs the plot shows.
    few = [row("fp16", 100.0), row("s6_marlin", 30.0)]
    many = few + [row(rung, 50.0 + i) for i, rung in enumerate(LADDER[:3])]
    for rows in (few, many):
        (ax,) = report.speedup_figure(rows).axes
        assert {line.get_label(): line.get_color() for line in ax.get_lines()}["s6_marlin"] == report.rung_colour("s6_marlin")


def test_the_waterfall_goes_from_rung_1_down_one_idea_per_bar():
    rows = [row("fp16", 100.0)] + [row(rung, us) for rung, us in zip(LADDER, (4000.0, 60.0, 70.0, 30.0, 25.0))]
    steps = report.waterfall_steps(rows, 16)
    assert [s[0] for s in steps] == list(LADDER)
    assert steps[0] == ("s1_numba_naive", 4000.0, 4000.0)
    assert steps[2] == ("s4_marlin_layout", 60.0, 70.0)  # an idea that cost time here: drawn upward
    assert steps[3] == ("s6_marlin", 70.0, 30.0)
    # Without rung 1 the waterfall starts at the slowest rung, and a 2:4-sparse rung is a
    # branch off the dense rung before it: a dense rung after it builds on that dense rung.
    rows = [row(rung, us) for rung, us in (("s3_tensor_cores", 60.0), ("s4_marlin_layout", 90.0), ("s6_marlin", 30.0),
                                           ("s7_sparse_marlin", 25.0), ("s8_hopper", 28.0))]  # fmt: skip
    steps = report.waterfall_steps(rows, 16)
    assert steps[0][0] == "s4_marlin_layout" and steps[-1] == ("s8_hopper", 30.0, 28.0)


def test_the_waterfall_draws_each_bar_in_its_rungs_colour_and_the_floors():
    pytest.importorskip("matplotlib")
    rows = [row("fp16", 100.0)] + [row(rung, us) for rung, us in zip(LADDER, (4000.0, 60.0, 70.0, 30.0, 25.0))]
    (ax,) = report.waterfall_figure(rows).axes
    from matplotlib.colors import to_hex

    assert [to_hex(bar.get_facecolor()) for bar in ax.patches] == [report.rung_colour(r) for r in LADDER]
    lines = {line.get_label() for line in ax.get_lines()}
    assert {"fp16 cuBLAS: 100.0 µs", "floor: int4 bytes: 0.5 µs", "floor: 2:4 sparse bytes: 0.4 µs"} <= lines
    # Where the favourite batch size was not measured, the one with the most rungs is shown.
    assert report.waterfall_batch([row("fp16", 1.0, M=4), row("s6_marlin", 1.0, M=4), row("s6_marlin", 1.0, M=64)]) == 4


def test_e2e_report_is_generated_from_the_json_lines_and_reproducible(tmp_path):
    pytest.importorskip("matplotlib")
    from steps.harness.report import write_e2e

    rows = [
        {"gpu": "Test GPU", "dims": "7b", "layers": 2, "group_size": 128, "date": "2026-11-25T12:00:00+00:00",
         "batch": b, "model": model, "step_us": step, "tokens_per_s": b / step * 1e6, "speedup_vs_fp16": 1000.0 / step,
         "linear_us": step / 2, "attention_us": 10.0, "rest_us": step / 2 - 10.0}
        for b in (1, 8) for model, step in (("fp16", 1000.0), ("s6_marlin", 500.0 + b))
    ]  # fmt: skip
    (tmp_path / "run.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_e2e(tmp_path)
    first_md, first_png = (tmp_path / "README.md").read_text(), (tmp_path / "e2e.png").read_bytes()
    assert "| 8 | s6_marlin | 508.0 |" in first_md and "1.97×" in first_md
    write_e2e(tmp_path)
    assert (tmp_path / "README.md").read_text() == first_md and (tmp_path / "e2e.png").read_bytes() == first_png
    # A second run of the same configuration on the same day is a table of its own, with its own FP16 rows.
    (tmp_path / "rerun.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_e2e(tmp_path)
    md = (tmp_path / "README.md").read_text()
    assert "(`rerun.jsonl`)" in md and "(`run.jsonl`)" in md and md.count("| 8 | fp16 |") == 2
    assert all(table.count("| 8 | fp16 |") == 1 for table in md.split("**Test GPU**")[1:])


def _agg_formats():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    return sorted(FigureCanvasAgg.get_supported_filetypes())


@pytest.mark.parametrize("fmt", _agg_formats() if __import__("importlib").util.find_spec("matplotlib") else [])
def test_every_plot_format_is_written_whole_and_reproducibly_or_refused(tmp_path, fmt):
    from steps.harness.report import plot_speedup

    path = tmp_path / f"plot.{fmt}"
    try:
        plot_speedup(list(fake_rows()), path)
    except Exception as e:  # a format whose writer needs what this machine lacks (pgf: LaTeX)
        assert not path.exists() and not list(tmp_path.iterdir()), "a failed plot left a file behind"
        assert str(e)
        return
    first = path.read_bytes()
    assert first
    plot_speedup(list(fake_rows()), path)
    assert path.read_bytes() == first, f"{fmt} output carries a timestamp"
