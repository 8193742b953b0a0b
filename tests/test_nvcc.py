"""Every CUDA source compiles with nvcc for sm_80 and sm_90: no errors, no warnings, no
register spills. The rungs are compiled at run time through NVRTC; this check runs the
same sources through the offline compiler on machines without a GPU (such as CI), so a
broken or spilling kernel is caught before anyone reaches a GPU. Skipped without nvcc.
Where cuobjdump is installed too, every shipped variant's machine code is checked for the
asynchronous-copy form that faults on the H100 (s5_pipeline.cuh, make_evict_first_policy)."""

import concurrent.futures
import itertools
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = sorted(CSRC.glob("*.cu"))
ARCHS = ("sm_80", "sm_90")
# Rungs built from Hopper-only instructions (wgmma, setmaxnreg) compile for sm_90a alone.
HOPPER_ONLY = {"s8_hopper.cu"}

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")


def compile_report(source: Path, arch: str, tmp_path: Path) -> str:
    target = f"-gencode=arch=compute_{arch[3:]}a,code={arch}a" if source.name in HOPPER_ONLY else f"-arch={arch}"
    cmd = [
        "nvcc", "-std=c++17", target, f"-I{CSRC}", "-cubin", "-o", str(tmp_path / f"{source.stem}.cubin"),
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
    if source.name in HOPPER_ONLY and arch != "sm_90":
        pytest.skip(f"{source.name} uses Hopper-only instructions")
    log = compile_report(source, arch, tmp_path)
    assert "warning" not in log.lower(), log
    assert "Potential Performance Loss" not in log, log  # e.g. ptxas serializing wgmma groups (C7513)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    assert not any(spills), f"{source.name} spills registers on {arch}:\n{log}"
    assert "Used" in log, f"ptxas printed no resource usage for {source.name}:\n{log}"


H100_SMEM = 227 * 1024  # opt-in dynamic shared memory per block


def shipped_configs(smem: int = H100_SMEM, sms: int = 132) -> list[tuple[str, object]]:
    """(rung, config) of every s5-s8 kernel configuration the host picks for the
    Llama-2 7B/70B and ideal shapes, batch sizes 1-128, every group size and, where the
    rung takes them, zero points and bf16, on a GPU with `smem` bytes of opt-in shared memory per
    block and `sms` SMs (an H100 by default); a case the rung refuses on that GPU is left out."""
    from unittest import mock

    import steps.s5_async_pipeline as s5
    import steps.s8_hopper as s8
    from steps.harness.bench import preset_shapes
    from steps.registry import get

    shapes = {shape for preset in ("llama-7b", "llama-70b", "ideal") for shape in preset_shapes(preset, 132)}
    found = set()
    with (
        mock.patch.object(s5, "max_dynamic_smem", lambda device: smem),
        mock.patch.object(s5, "sm_count", lambda device: sms),
        mock.patch.object(s8, "max_dynamic_smem", lambda device: smem),
    ):
        for name in ("s5_async_pipeline", "s6_marlin", "s7_sparse_marlin", "s8_hopper"):
            step = get(name)
            zero_points = (False, True) if step.supports_zero_points else (False,)
            bf16 = (False, True) if "bfloat16" in step.activation_dtypes else (False,)
            for (K, N), M, g, z, b in itertools.product(shapes, (1, 16, 32, 48, 64, 128), GROUPS, zero_points, bf16):
                if step.supports(M, K, N, g):
                    try:
                        found.add((name, step.config(M, K, N, g, 0, z, b)))
                    except ValueError as e:
                        assert "shared memory" in str(e), e
    return sorted(found, key=repr)


def shipped_variants() -> list[tuple[str, tuple[tuple[str, int], ...]]]:
    """(source, defines) of every s3-s8 kernel variant shipped (see shipped_configs): the
    defaults in the sources are only one of them. The defines carry the host's launch figures,
    which each kernel checks against its own at compile time."""
    from steps.s3_tensor_cores import defines as s3_defines
    from steps.s4_marlin_layout import MarlinLayout

    found = {("s3_tensor_cores", s3_defines(tiles, bn)) for tiles in (1, 2, 4) for bn in (64, 128)}
    found |= {("s4_marlin_layout", MarlinLayout().defines(mb, g)) for mb in range(1, 5) for g in GROUPS}
    found |= {(name, cfg.defines()) for name, cfg in shipped_configs()}
    return sorted(found)


GROUPS = (-1, 32, 64, 128)


# A cp.async (SASS LDGSTS) whose shared address adds a uniform register to a register.
FAULTING_COPY = re.compile(r"LDGSTS\S*\s+\[R\d+\+UR\d+")


def faulting_copies(cubin: Path) -> list[str]:
    """The copies of the form that faults with "illegal instruction" on the H100; [] without cuobjdump."""
    if shutil.which("cuobjdump") is None:
        return []
    sass = subprocess.run(["cuobjdump", "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    return [line.strip() for line in sass.splitlines() if FAULTING_COPY.search(line)]


@pytest.mark.parametrize(
    "line, faults",
    [
        ("LDGSTS.E.BYPASS.LTC128B.128 [R16+UR0+0x1000], desc[UR1][R8.64] ;", True),
        ("LDGSTS.E.BYPASS.LTC128B.128 [R8+UR0], desc[UR1][R2.64] ;", True),
        ("LDGSTS.E.BYPASS.LTC128B.128 [R91+0x2000], desc[UR18][R128.64] ;", False),
        ("LDGSTS.E.BYPASS.LTC128B.128 [R71], desc[UR16][R126.64], P1 ;", False),
        ("LDS.128 R100, [R131+UR4+0x6000] ;", False),
    ],
)
def test_the_faulting_copy_form_is_recognised(line, faults):
    assert bool(FAULTING_COPY.search(line)) == faults


@needs_nvcc
def test_every_shipped_variant_compiles_for_sm90_without_warnings_or_spills(tmp_path):
    variants = shipped_variants()
    assert len({source for source, _ in variants}) == 6

    def compile_variant(i: int) -> str | None:
        source, defines = variants[i]
        flags = [f"-D{name}={value}" for name, value in defines]
        target = "-gencode=arch=compute_90a,code=sm_90a" if f"{source}.cu" in HOPPER_ONLY else "-arch=sm_90"
        cmd = [
            "nvcc", "-std=c++17", target, f"-I{CSRC}", "-cubin", "-o", str(tmp_path / f"{i}.cubin"),
            "-Xptxas", "-v", "--Werror", "all-warnings", *flags, str(CSRC / f"{source}.cu"),
        ]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True)
        log = result.stdout + result.stderr
        spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
        if result.returncode or "warning" in log.lower() or "Potential Performance Loss" in log or any(spills):
            return f"{source} {' '.join(flags)}:\n{log}"
        faulting = faulting_copies(tmp_path / f"{i}.cubin")
        if faulting:
            return f"{source} {' '.join(flags)}: copies addressed through a uniform register:\n" + "\n".join(faulting)
        return None

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        failures = [f for f in pool.map(compile_variant, range(len(variants))) if f]
    assert not failures, "\n\n".join(failures)


def test_every_shipped_striped_tile_fits_the_partial_sum_slot():
    """The global reduction gives each block a slot of `partial_floats` floats (MAX_PARTIAL_FLOATS
    for s6 and s7, a 128-row slab's for s8); a tile whose partial sums were larger would overlap
    its neighbour's slot. s8's 128-row slabs (both consumer warpgroups on every tile) are shipped."""
    from steps.registry import get
    from steps.s8_hopper import TILE_N

    s8_slabs = set()
    for source, defines in shipped_variants():
        d = dict(defines)
        if source in ("s6_marlin", "s7_sparse_marlin"):
            assert 16 * d["M_BLOCKS"] * d["TILE_N"] <= get(source).partial_floats, (source, d)
        if source == "s8_hopper":
            assert 16 * d["M_BLOCKS"] * TILE_N <= get(source).partial_floats, (source, d)
            s8_slabs.add(16 * d["M_BLOCKS"])
    assert s8_slabs == {16, 32, 48, 64, 128}


@pytest.mark.parametrize("smem, sms", [(H100_SMEM, 132), (163 * 1024, 108), (99 * 1024, 84)], ids=["H100", "A100", "sm_86"])
def test_every_configuration_fits_the_shared_memory_of_its_gpu(smem, sms):
    """Stages plus an own reduction buffer must stay within what a block may opt into; on
    a small GPU the rungs fall back to narrower tiles (or refuse, with a clear error)."""
    configs = shipped_configs(smem, sms)
    names = {name for name, _ in configs}
    assert names - {"s8_hopper"} == {"s5_async_pipeline", "s6_marlin", "s7_sparse_marlin"}
    assert "s8_hopper" in names or smem < H100_SMEM  # the Hopper rung fits its own GPU
    for name, cfg in configs:
        assert cfg.smem_bytes <= smem, (name, cfg, cfg.smem_bytes)


def test_every_ablation_of_rung_8_still_finds_its_place_in_the_kernel():
    """scripts/s8_variants.py edits csrc/s8_hopper.cu by exact text; a kernel change that moves
    that text must update the ablation, not silently break the tool."""
    import sys

    sys.path.insert(0, str(CSRC.parent / "scripts"))
    import s8_variants

    source = (CSRC / "s8_hopper.cu").read_text()
    for name in s8_variants.ABLATIONS:
        assert s8_variants.ablated(name, source) != source, name
