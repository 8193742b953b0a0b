"""The command line as a user runs it, in a subprocess."""

import json
import subprocess
import sys

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
    assert "s0_numpy" in result.stdout and "fp16" in result.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["rung"] for r in rows} == {"fp16", "s0_numpy"}
    assert all(r["us"] > 0 and r["max_error_ratio"] <= 1 for r in rows)
    assert all({"date", "gpu", "versions"} <= r.keys() for r in rows)


def test_bad_arguments_are_one_line_errors():
    result = run_cli("bench", "--cpu", "--shapes", "banana", "--quiet")
    assert result.returncode == 2
    assert "unknown shape preset" in result.stderr and "Traceback" not in result.stderr
