"""Compare the machine code of the shipped s4-s7 kernels before and after a source restructure.

The restructure of csrc/ into one header per rung (s4_fragments, s5_pipeline, s6_stripes)
claims that most kernels' source only moved. This script checks the claim without a GPU:
it compiles every shipped variant (tests/test_nvcc.py: shipped_variants) from this checkout
and from a checkout of the old commit with nvcc -cubin for one architecture, disassembles
both with cuobjdump -sass, drops addresses and headers, and compares the instructions and
their encodings (which hold the scheduling bits). It writes a Markdown report naming the identical and the changed variants.

    git worktree add /tmp/base 53620aa
    python scripts/compare_sass.py --base /tmp/base --out docs/results/restructure_sass.md

The old sources take the group size as GROUP_ROWS (0 for group size -1) and have no launch
figures; `old_defines` translates. Needs nvcc, cuobjdump and nvdisasm on PATH (the
nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm wheels carry the latter two).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.test_nvcc import shipped_variants  # noqa: E402

# Why a rung's code may differ, where its source did more than move (see the commit log).
CHANGES = {
    "s4_marlin_layout": "none expected: the kernel's helpers moved to s4_fragments.cuh unchanged",
    "s5_async_pipeline": (
        "s5's pipeline walks one column slice with SliceCursor (entered by the run's first "
        "fetch, `t == begin`) instead of s6's RunCursor with its `left` count, and reduces over its "
        "stages without the kOwnReduceBuffer switch"
    ),
    "s6_marlin": (
        "none expected for the mma.sync variants: StripedPipeline composes s5's pipeline with "
        "RunCursor and its own reduction buffer, the same operations as the old flags selected"
    ),
    "s7_sparse_marlin": (
        "its pipeline's start, fetch outline and consume loop are now s5's ring skeleton (ring_start, "
        "ring_fetch, ring_consume) with its own streams and fragments: the same operations in the same order"
    ),
}


def old_defines(source: str, defines: tuple[tuple[str, int], ...]) -> list[tuple[str, int]]:
    """The same variant as the old sources spell it."""
    out = []
    for name, value in defines:
        if name in ("LAUNCH_THREADS", "LAUNCH_SMEM_BYTES") or (source == "s4_marlin_layout" and name == "THREADS"):
            continue
        if name == "GROUP_SIZE":
            name, value = "GROUP_ROWS", 0 if value == -1 else value
        out.append((name, value))
    return out


ADDRESS = re.compile(r"/\*[0-9a-f]{4,}\*/")
ENCODING = re.compile(r"/\* 0x[0-9a-f]+ \*/")
REGISTER = re.compile(r"\bU?[RP]\d+\b")


def without_registers(sass_text: str) -> list[str]:
    """The instructions with every register name replaced and the encodings dropped: equal for
    two kernels that differ only in register allocation."""
    lines = (REGISTER.sub("reg", ENCODING.sub("", line)).strip() for line in sass_text.splitlines())
    return [line for line in lines if line]


def sass(tree: Path, source: str, defines, arch: str, workdir: Path, tag: str) -> str:
    cubin = workdir / f"{tag}.cubin"
    flags = [f"-D{n}={v}" for n, v in defines]
    cmd = ["nvcc", "-std=c++17", f"-arch={arch}", f"-I{tree / 'csrc'}", "-cubin", "-o", str(cubin), *flags,
           str(tree / "csrc" / f"{source}.cu")]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    text = subprocess.run(["cuobjdump", "-sass", str(cubin)], check=True, capture_output=True, text=True).stdout
    lines = []
    for line in text.splitlines():
        line = ADDRESS.sub("", line).strip()  # encodings stay: they hold the scheduling bits
        if line and not line.startswith(("code for", "Fatbin", "arch =", "code version", "host =", "compile_size",
                                          "..........", "Function :", ".headerflags")):  # fmt: skip
            lines.append(line)
    return "\n".join(lines)


def compare(base: Path, arch: str) -> list[tuple[str, tuple, str, int, int]]:
    """(source, defines, verdict, lines before, lines differing) per shipped variant; the verdict
    is "identical", "registers" (the same instructions, other registers) or "changed"."""
    variants = [v for v in shipped_variants() if v[0] in CHANGES]
    with tempfile.TemporaryDirectory() as tmp:

        def one(i: int):
            source, defines = variants[i]
            before = sass(base, source, old_defines(source, defines), arch, Path(tmp), f"{i}-before")
            after = sass(ROOT, source, defines, arch, Path(tmp), f"{i}-after")
            b, a = before.splitlines(), after.splitlines()
            differing = sum((Counter(b) - Counter(a)).values()) + sum((Counter(a) - Counter(b)).values())
            if before == after:
                verdict = "identical"
            elif without_registers(before) == without_registers(after):
                verdict = "registers"
            else:
                verdict = "changed"
            return source, defines, verdict, len(b), differing

        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
            return list(pool.map(one, range(len(variants))))


def report(results, base_commit: str, arch: str) -> str:
    lines = [
        "# Machine code before and after the csrc restructure",
        "",
        f"Generated by `python scripts/compare_sass.py` (nvcc `-cubin -arch={arch}`, `cuobjdump -sass`, "
        "addresses and headers stripped, encodings kept) over every shipped s4-s7 variant "
        f"(tests/test_nvcc.py: shipped_variants), old sources at `{base_commit}`. Not edited by hand.",
        "",
        "| rung | variants | byte-identical | same instructions, other registers | changed | why a change is expected |",
        "|---|---|---|---|---|---|",
    ]
    by_rung: dict[str, list] = {}
    for r in results:
        by_rung.setdefault(r[0], []).append(r)
    for rung, rows in sorted(by_rung.items()):
        n = Counter(r[2] for r in rows)
        lines.append(f"| {rung} | {len(rows)} | {n['identical']} | {n['registers']} | {n['changed']} | {CHANGES.get(rung, '')} |")
    changed = [r for r in results if r[2] != "identical"]
    lines += ["", "## Changed variants", ""]
    if not changed:
        lines.append("None.")
    else:
        lines += ["| rung | defines | verdict | SASS lines before | lines differing |", "|---|---|---|---|---|"]
        for source, defines, verdict, n, differing in changed:
            d = " ".join(f"{k}={v}" for k, v in defines if not k.startswith("LAUNCH_"))
            lines.append(f"| {source} | {d} | {verdict} | {n} | {differing} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="a checkout of the old commit")
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results/restructure_sass.md")
    args = parser.parse_args()
    commit = subprocess.run(["git", "-C", str(args.base), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()  # fmt: skip
    args.out.write_text(report(compare(args.base, args.arch), commit, args.arch))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
