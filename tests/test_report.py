"""The results section is generated from data, and regenerating it changes nothing."""

import json

import pytest

from steps.harness.report import END, START, write_report


def fake_rows():
    for M in (1, 16):
        for rung, us in (("fp16", 100.0), ("s1_numba_naive", 400.0)):
            yield {
                "date": "2026-11-25T12:00:00+00:00", "device": "cuda", "gpu": "Test GPU", "sms": 2, "l2_bytes": 1,
                "versions": {"torch": "x", "cupy": "y"}, "preset": "llama-7b", "shape": "sum", "K": 8, "N": 8, "M": M,
                "group_size": 128, "rung": rung, "us": us * M, "q1_us": us, "q3_us": us, "method": "cuda-graph",
                "speedup_vs_fp16": 100.0 / us, "weight_bytes": 1000, "weight_gbps": 1.0, "read_bw_gbps": 2.0,
                "pct_of_read_bw": 50.0, "max_error_ratio": 0.1,
            }  # fmt: skip


def test_report_fills_the_readme_section_reproducibly(tmp_path):
    pytest.importorskip("matplotlib")
    results = tmp_path / "results"
    results.mkdir()
    (results / "run.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fake_rows()))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{START}\nold\n{END}\noutro\n")
    write_report(results, readme)
    first_text, first_png = readme.read_text(), (results / "ladder.png").read_bytes()
    assert "old" not in first_text and first_text.startswith("intro") and first_text.endswith("outro\n")
    assert "| s1_numba_naive |" in first_text and "0.25×" in first_text and "floor" in first_text
    write_report(results, readme)
    assert readme.read_text() == first_text
    assert (results / "ladder.png").read_bytes() == first_png


def test_e2e_report_is_generated_from_the_json_lines_and_reproducible(tmp_path):
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
