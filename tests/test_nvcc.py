"""Every CUDA source compiles with nvcc for sm_80 and sm_90: no errors, no warnings, no
register spills. The rungs are compiled at run time through NVRTC; this check runs the
same sources through the offline compiler on machines without a GPU (such as CI), so a
broken or spilling kernel is caught before anyone reaches a GPU. Skipped without nvcc."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = sorted(CSRC.glob("*.cu"))
ARCHS = ("sm_80", "sm_90")

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")


def compile_report(source: Path, arch: str, tmp_path: Path) -> str:
    cmd = [
        "nvcc", "-std=c++17", f"-arch={arch}", f"-I{CSRC}", "-cubin", "-o", str(tmp_path / f"{source.stem}.cubin"),
        "-Xptxas", "-v", "--Werror", "all-warnings", str(source),
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{log}"
    return log


def test_there_are_cuda_sources_to_check():
    assert CSRC.is_dir()


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", SOURCES, ids=[s.name for s in SOURCES])
def test_compiles_without_warnings_or_spills(source, arch, tmp_path):
    log = compile_report(source, arch, tmp_path)
    assert "warning" not in log.lower(), log
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    assert not any(spills), f"{source.name} spills registers on {arch}:\n{log}"
    assert "Used" in log, f"ptxas printed no resource usage for {source.name}:\n{log}"
