"""The command line as a user runs it, in a subprocess."""

import json
import os
import subprocess
import sys

import pytest

from steps import STEPS


def run_cli(*args, tmp_path=None):
    return subprocess.run([sys.executable, "-m", "steps", *args], capture_output=True, text=True, cwd=tmp_path)


def test_list_names_every_rung():
    result = run_cli("list")
    assert result.returncode == 0, result.stderr
    for step in STEPS:
        assert step.name in result.stdout


def test_check_passes():
    result = run_cli("check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "s0_numpy" in result.stdout and "FAIL" not in result.stdout


def test_cpu_bench_prints_a_table_and_writes_json(tmp_path):
    out = tmp_path / "r.jsonl"
    result = run_cli("bench", "--cpu", "--batch", "1", "4", "--quiet", "--json", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CPU rungs only" in result.stdout
    assert "s0_numpy" in result.stdout and "numpy-fp32" in result.stdout and "NumPy float32" in result.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["rung"] for r in rows} == {"numpy-fp32", "s0_numpy"}  # the CPU baseline is named for what it is
    assert {r["baseline"] for r in rows} == {"NumPy float32 matmul"}
    assert all(r["us"] > 0 and r["max_error_ratio"] <= 1 for r in rows)
    assert all({"date", "gpu", "versions"} <= r.keys() for r in rows)


def test_bad_arguments_are_one_line_errors():
    result = run_cli("bench", "--cpu", "--shapes", "banana", "--quiet")
    assert result.returncode == 2
    assert "unknown shape preset" in result.stderr and "Traceback" not in result.stderr


# -- refusals: each a one-line error with rc != 0, before any work (in-process: fast) -------------


def _refused(capsys, args, *phrases):
    from steps.harness.cli import main

    try:
        rc = main(list(args))
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    out, err = capsys.readouterr()
    assert rc != 0, out
    assert "Traceback" not in err and all(p in err for p in phrases), err
    assert "Benchmarking" not in out  # refused before any work started


def test_unknown_or_unavailable_rungs_are_named_not_dropped(capsys):
    _refused(capsys, ["bench", "--cpu", "--quiet", "--rungs", "s0_numpy", "nope"], "unknown rung(s) nope")
    _refused(capsys, ["bench", "--cpu", "--quiet", "--rungs", "s0_numpy", "s6_marlin"], "s6_marlin", "CUDA GPU")


def test_batch_sizes_must_be_positive(capsys):
    for bad in ("0", "-3", "two"):
        _refused(capsys, ["bench", "--cpu", "--quiet", "--batch", bad], "--batch", ">= 1")


def test_outputs_are_checked_before_the_run(capsys, tmp_path):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    _refused(capsys, ["bench", "--cpu", "--quiet", "--json", str(folder)], "--json", "folder")
    _refused(capsys, ["bench", "--cpu", "--quiet", "--plot", str(tmp_path / "x.banana")], ".png", ".svg")
    assert not (tmp_path / "x.banana").exists()


def test_json_and_plot_folders_are_created(tmp_path):
    pytest.importorskip("matplotlib")
    out, plot = tmp_path / "new" / "r.jsonl", tmp_path / "other" / "p.svg"
    result = run_cli("bench", "--cpu", "--quiet", "--batch", "1", "--shapes", "256,128", "--json", str(out), "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    assert out.read_text().count("\n") == 2 and plot.read_text().startswith("<?xml")
    assert "small shape" not in result.stdout  # said only when the default shape was chosen
    assert "NumPy float32" in plot.read_text()  # the axis names the CPU baseline


def test_help_shows_defaults():
    result = run_cli("bench", "--help")
    assert result.returncode == 0 and "(default: 128)" in " ".join(result.stdout.split())


def test_list_says_how_to_run_s1_on_a_cpu():
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    result = subprocess.run([sys.executable, "-m", "steps", "list"], capture_output=True, text=True, env=env)
    s1 = result.stdout.split("s1_numba_naive", 1)[1].split("s2_smem_tiling", 1)[0]
    assert "[available]" in s1 or "NUMBA_ENABLE_CUDASIM=1" in s1, s1
