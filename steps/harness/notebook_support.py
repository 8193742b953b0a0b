"""What the chapters (notebooks/NN_name.py) share: the one place they get their helpers.

Each notebook is a chapter about one rung. With these helpers it shows the rung's own
source (never a copy of it), checks the rung against the reference, puts the rung's
stored times beside the rung below it (every GPU of the committed results, the newest
first), and states the memory floor, without re-implementing any of that: times come from
`steps.harness.bench`, stored results, tables and pictures from `steps.harness.report`,
the error bound from `reference.error_excess`.

Everything degrades to a plain sentence when this checkout or this machine lacks
something: a rung that is not written yet, no GPU, no stored results. So every notebook
runs top to bottom anywhere, and on a GPU the same cells measure live.

Helpers return small objects that render as Markdown in a notebook and as plain text
elsewhere; nothing here needs IPython.
"""

from __future__ import annotations

import io
import re
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reference import error_excess, random_quantized_weight

from . import bench, report
from ..registry import STEPS
from ..step import Step

REPO = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO / "docs" / "results"

# Used only when no GPU is here and no stored result says otherwise.
H100_SMS = 132  # H100 SXM
H100_NOMINAL_GBPS = 3350.0  # H100 SXM HBM3, the datasheet figure; measured reads reach ~3080
LANGUAGES = {".py": "python", ".cu": "cuda", ".cuh": "cuda"}


@dataclass(frozen=True)
class Md:
    """Text that a notebook renders as Markdown."""

    text: str

    def _repr_markdown_(self) -> str:
        return self.text

    def __str__(self) -> str:
        return self.text

    __repr__ = __str__


# -- the rungs --------------------------------------------------------------------------
def rung(name: str) -> Step | None:
    """The rung called `name`, or None when this checkout does not have it yet."""
    return next((s for s in STEPS if s.name == name), None)


def rung_status(name: str) -> Md:
    """One sentence: is the rung in this checkout, and can this machine run it?"""
    step = rung(name)
    if step is None:
        have = ", ".join(s.name for s in STEPS)
        return Md(f"**`{name}` is not in this checkout yet** (the ladder here has: {have}).")
    ok = step.available()
    where = "runs here" if ok else f"cannot run here: {ok.reason}"
    return Md(f"**`{name}`** — {step.title}. {step.idea} *This machine: {where}.*")


# -- source code ------------------------------------------------------------------------
def _py_block_end(lines: list[str], i: int) -> int:
    """Last line of the def/class starting at line i: past its (possibly multi-line)
    header, then every line indented deeper than the header."""
    indent = len(lines[i]) - len(lines[i].lstrip())
    depth, k = 0, i
    while k < len(lines):
        depth += sum(lines[k].count(c) for c in "([{") - sum(lines[k].count(c) for c in ")]}")
        if depth <= 0 and lines[k].rstrip().endswith(":"):
            break
        k += 1
    end = k
    for j in range(k + 1, len(lines)):
        if not lines[j].strip():
            continue
        if len(lines[j]) - len(lines[j].lstrip()) <= indent:
            break
        end = j
    return end


def _cu_block_end(lines: list[str], i: int) -> int:
    """Last line of the C++ entity starting at line i: its braces balanced, or its ';'."""
    depth, opened = 0, False
    for j in range(i, len(lines)):
        code = lines[j].split("//", 1)[0]
        depth += code.count("{") - code.count("}")
        opened |= "{" in code
        if (opened and depth <= 0) or (not opened and code.rstrip().endswith(";")):
            return j
    return len(lines) - 1


def _with_preamble(lines: list[str], i: int, suffix: str) -> int:
    """Move the start up over the comments, decorators or template / extern line that belong to it."""
    lead = ("@",) if suffix == ".py" else ("//", "template", 'extern "C"')
    while i > 0 and lines[i - 1].strip().startswith(lead):
        i -= 1
    return i


def source_region(path: str, start: str | None = None, end: str | None = None) -> tuple[int, list[str]] | None:
    """(first line number, lines) of a region of a file in this repository, or None.

    `start` is text on the region's first line (a marker comment, `def name`, a kernel's
    name); the region ends at the first later line containing `end`, or, without `end`,
    where the function, class or brace block that starts there ends. Comments right
    above the start belong to it. None if the file or either text is not there.
    """
    file = REPO / path
    if not file.is_file():
        return None
    lines = file.read_text().splitlines()
    if start is None:
        return 1, lines
    i = next((k for k, line in enumerate(lines) if start in line), None)
    if i is None:
        return None
    if end is not None:
        j = next((k for k in range(i + 1, len(lines)) if end in lines[k]), None)
        if j is None:
            return None
    else:
        j = _py_block_end(lines, i) if file.suffix == ".py" else _cu_block_end(lines, i)
    i = _with_preamble(lines, i, file.suffix)
    return i + 1, lines[i : j + 1]


def show_source(path: str, start: str | None = None, end: str | None = None) -> Md:
    """A region of a source file (see `source_region`) as a highlighted code block."""
    found = source_region(path, start, end)
    if found is None:
        what = f"`{path}`" if start is None else f"`{start}` in `{path}`"
        exists = (REPO / path).is_file()
        return Md(f"*{what} is not in this checkout yet{'' if not exists else ' (the file exists; the region does not)'}.*")
    first, lines = found
    where = f"`{path}`" + ("" if start is None else f", lines {first}–{first + len(lines) - 1}")
    fence = LANGUAGES.get(Path(path).suffix, "")
    return Md(f"{where}\n\n```{fence}\n" + "\n".join(lines) + "\n```")


def cuda_constants(path: str) -> dict[str, int]:
    """Integer `constexpr int NAME = value;` and `#define NAME value` of a CUDA source, so
    pictures of a kernel's tiling are drawn from the kernel's own numbers."""
    text = (REPO / path).read_text() if (REPO / path).is_file() else ""
    found = {m[0]: int(m[1]) for m in re.findall(r"#define\s+(\w+)\s+(\d+)\b", text)}
    found |= {m[0]: int(m[1]) for m in re.findall(r"constexpr\s+int\s+(\w+)\s*=\s*(\d+)\s*;", text)}
    return found


# -- correctness ------------------------------------------------------------------------
def check(name: str, M: int, K: int, N: int, group_size: int = 128, seed: int = 0) -> Md:
    """Run rung `name` once on random data and hold it to the reference's error bound.

    CPU rungs and simulated CUDA rungs take NumPy arrays; CUDA rungs get CuPy copies. A
    rung that is missing or cannot run here is reported, not failed."""
    step = rung(name)
    if step is None or not step.available():
        return Md(f"Correctness check of `{name}` skipped: {rung_status(name).text}")
    if not step.supports(M, K, N, group_size):
        return Md(f"`{name}` does not take M={M}, K={K}, N={N}, group {group_size}: {step.supports(M, K, N, group_size).reason}")
    rng = np.random.default_rng(seed)
    qw = random_quantized_weight(rng, K, N, group_size)
    A = rng.standard_normal((M, K), dtype=np.float32).astype(np.float16)
    if step.host_arrays:
        C = step(A, step.pack(qw))
    else:
        import cupy

        C = step(cupy.asarray(A), step.pack(qw)).get()
    ratio = error_excess(C, A, qw, step.error_c)
    verdict = "passes" if ratio <= 1 else "FAILS"
    where = "on the CPU" if step.device == "cpu" else "in Numba's CUDA simulator" if step.host_arrays else "on the GPU"
    return Md(
        f"`{name}` {where}, M={M} K={K} N={N} group {group_size}: largest error / bound = **{ratio:.3f}** "
        f"(bound c·u·(|A|@|W|) with c = {step.error_c:g}) — {verdict}."
    )


# -- stored results, the floor ------------------------------------------------------------
def stored_rows(name: str | None = None, preset: str | None = "ideal") -> list[dict]:
    """Committed GPU rows (docs/results/*.jsonl, newest per key) of one rung (all rungs
    if None) for one preset (all presets if None), ordered by GPU, shape and batch size."""
    rows = [r for r in report.load_rows(RESULTS_DIR) if r["device"] == "cuda" and preset in (None, r["preset"])]
    if name is not None:
        rows = [r for r in rows if r["rung"] == name]
    return sorted(rows, key=lambda r: (r["gpu"], r["shape"], r["M"]))


def stored_gpus() -> list[str]:
    """The GPUs of the committed results, the newest first (as `report.gpus_newest_first`)."""
    return report.gpus_newest_first(stored_rows(None, None))


def stored_by_batch(name: str, preset: str = "ideal", gpu: str | None = None, group_size: int = 128) -> dict[int, dict]:
    """Rung `name`'s stored rows on `gpu` (default: the newest GPU) for one preset, by batch
    size M: the preset's headline shape (its single shape, or the sum over a model's layers,
    as in `report.headline_groups`). Empty when nothing is stored."""
    gpu = gpu or next(iter(stored_gpus()), None)
    rows = [r for r in stored_rows(name, preset) if r["gpu"] == gpu and r["group_size"] == group_size]
    groups = list(report.headline_groups(rows).values())
    return {r["M"]: r for r in groups[0]} if groups else {}


def measured(name: str, below: str, presets=("ideal", "llama-7b"), batches=(1, 16, 64)) -> Md:
    """The stored times of rung `name` beside the rung below it at a few batch sizes, with the
    gain (the time below over this rung's), GPU by GPU, the newest first, for each preset;
    then both rungs' rows of the Nsight Compute profiles."""

    def cell(row: dict | None) -> str:
        return f"{row['us']:,.1f} µs · {row['speedup_vs_fp16']:.3g}×" if row else "not stored"

    parts = []
    for gpu in stored_gpus():
        for preset in presets:
            this, prev = stored_by_batch(name, preset, gpu), stored_by_batch(below, preset, gpu)
            if not this:
                continue
            shape = next(iter(this.values()))["shape"]
            parts += [f"*{gpu}, preset `{preset}` ({'sum of its layers' if shape == 'sum' else shape}): "
                      "time · speedup over FP16, and the gain over the rung below.*", "",
                      f"| M | {below} | {name} | gain |", "|---:|---:|---:|---:|"]  # fmt: skip
            for M in batches:
                a, b = prev.get(M), this.get(M)
                gain = f"{a['us'] / b['us']:.3g}×" if a and b else "no stored pair"
                parts.append(f"| {M} | {cell(a)} | {cell(b)} | {gain} |")
            parts.append("")
    if not parts:
        parts = [f"*No stored measurement of `{name}` (presets {', '.join(presets)}) exists yet.*", ""]
    return Md("\n".join(parts) + "\n" + ncu_rows(below, name).text)


@dataclass(frozen=True)
class Picture:
    """A matplotlib figure that a notebook shows as a PNG (report's figures belong to no
    pyplot backend, so the notebook's inline backend would not draw them by itself)."""

    figure: Any

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png", dpi=90)
        return buffer.getvalue()


def stored_pictures() -> list[tuple[str, list[Picture]]]:
    """(GPU, [speedup plot, waterfall]) from the committed results, the newest GPU first:
    the pictures of the README, drawn by `steps.harness.report`."""
    rows = stored_rows(None, None)
    return [
        (gpu, [Picture(figure([r for r in rows if r["gpu"] == gpu])) for _, _, figure in report.PICTURES])
        for gpu in stored_gpus()
    ]


def ncu_rows(*names: str) -> Md:
    """The rows of these kernels in the committed Nsight Compute profiles
    (docs/results/*ncu*.csv, as `report.ncu_markdown` renders them), or a sentence saying
    that no profile has them."""
    parts = []
    for path in sorted(RESULTS_DIR.glob("*ncu*.csv")):
        head, rule, *body = report.ncu_markdown(path).splitlines()
        picked = [line for line in body if line.split("|")[1].strip() in names]
        if picked:
            parts += [f"*Nsight Compute, one launch per kernel, `{path.stem}`:*", "", head, rule, *picked, ""]
    if not parts:
        return Md(f"*No stored Nsight Compute profile has {' or '.join(f'`{n}`' for n in names)} yet.*")
    return Md("\n".join(parts).rstrip())


def measured_read_gbps() -> tuple[float, str] | None:
    """The median streaming-read bandwidth over the newest GPU's stored rows, and its name."""
    gpus = stored_gpus()
    if not gpus:
        return None
    return statistics.median(r["read_bw_gbps"] for r in stored_rows(None, None) if r["gpu"] == gpus[0]), gpus[0]


def benchmark_shape() -> tuple[int, int, int, str]:
    """(K, N, SMs, where the SM count came from) of the 'ideal' preset: K = 256·SMs, N = 128·SMs."""
    if bench.gpu_present():
        machine = bench.describe_machine("cuda")
        sms, source = machine.sms, f"the {machine.name} here"
    else:
        gpus = stored_gpus()
        stored = next((r for r in stored_rows(None, None) if r["gpu"] == gpus[0]), None) if gpus else None
        sms, source = (stored["sms"], f"the {stored['gpu']} of the stored results") if stored else (H100_SMS, "an H100 SXM")
    (K, N), = bench.preset_shapes("ideal", sms)
    return K, N, sms, source


def weight_bytes(K: int, N: int, group_size: int = 128, sparse_2_4: bool = False) -> int:
    """Bytes a product must read: int4 codes, fp16 scales, and for 2:4 weights half the
    codes plus 2 bits of position metadata per kept code."""
    groups = 1 if group_size == -1 else K // group_size
    scales = 2 * groups * N
    if sparse_2_4:
        return (K // 2) * N // 2 + (K // 2) * N // 4 + scales
    return K * N // 2 + scales


@dataclass(frozen=True)
class Floor:
    """The memory floor: bytes that must be read divided by the read bandwidth."""

    nbytes: int
    gbps: float
    bandwidth_source: str

    @property
    def us(self) -> float:
        return self.nbytes / (self.gbps * 1e3)

    def _repr_markdown_(self) -> str:
        return (
            f"{self.nbytes / 1e6:,.1f} MB / {self.gbps:,.0f} GB/s ({self.bandwidth_source}) = **{self.us:,.1f} µs**"
        )

    __str__ = _repr_markdown_


def floor(K: int, N: int, group_size: int = 128, packed=None, sparse_2_4: bool = False, gbps: float | None = None) -> Floor:
    """The floor of one product. Bytes: a rung's `Packed.streamed_bytes` if given, else
    `weight_bytes`. Bandwidth: `gbps` if given, else the read bandwidth measured in the
    stored results, else the H100's nominal figure (and the Floor says which)."""
    nbytes = packed.streamed_bytes if packed is not None else weight_bytes(K, N, group_size, sparse_2_4)
    if gbps is not None:
        return Floor(nbytes, gbps, "given")
    measured = measured_read_gbps()
    if measured is not None:
        return Floor(nbytes, measured[0], f"streaming reads measured on the {measured[1]}")
    return Floor(nbytes, H100_NOMINAL_GBPS, "H100 SXM nominal; no stored measurement yet")


# -- the benchmark cell -------------------------------------------------------------------
def _tables(rows: list[dict], heading: str) -> Md:
    parts = [heading]
    for (gpu, preset, shape, g), rs in report.headline_groups(rows).items():
        date = max(r["date"] for r in rs)[:10]
        baseline = next((bench.BASELINE_TITLES[r["rung"]] for r in rs if r["rung"] in bench.BASELINE_TITLES), "FP16 cuBLAS")
        parts += ["", f"*{gpu}, preset `{preset}` ({shape}), group {g}, measured {date}.* "
                  f"Each cell: median time · speedup over {baseline} · share of the measured read bandwidth.",
                  "", report.markdown_table(rs)]  # fmt: skip
    return Md("\n".join(parts))


def benchmark(name: str, below: str | None = None, preset: str = "ideal", batches=(1, 16, 64)) -> Md:
    """The rung's benchmark rows beside the rung below it and FP16.

    Live where this machine can run the rung (`steps.harness.bench.run`: on a GPU for CUDA rungs,
    on the CPU's small shape and batches for CPU rungs); otherwise the committed GPU results; otherwise
    a note saying there are none yet."""
    step = rung(name)
    names = [n for n in (below, name) if n is not None and rung(n) is not None]
    live_cpu = step is not None and step.device == "cpu"
    live_gpu = step is not None and step.device == "cuda" and bench.gpu_present() and step.available()
    if live_cpu or live_gpu:
        device = "cpu" if live_cpu else "cuda"
        preset, batches = ("cpu-small", bench.CPU_BATCHES) if live_cpu else (preset, batches)
        runnable = [n for n in names if rung(n).device == device and rung(n).available()]
        machine, _, rows = bench.run(preset, batches, runnable, device=device, progress=False)
        dicts = [asdict(r) | {"gpu": machine.name, "date": "now"} for r in rows]
        return _tables(dicts, f"Measured live on this machine ({machine.name}, {device}):")
    wanted = {"fp16", name} | ({below} if below else set())
    rows = [r for r in stored_rows(None, preset) if r["rung"] in wanted]
    why = "no GPU here" if not bench.gpu_present() else rung_status(name).text
    if not any(r["rung"] == name for r in rows):
        note = "" if not rows else "\n\n" + _tables(rows, "What is stored for the rungs around it:").text
        return Md(
            f"*No stored GPU results for `{name}` (preset `{preset}`) yet ({why}). On a GPU, "
            f"`python -m steps bench --rungs {name} --json docs/results/<gpu>.jsonl` measures them.*{note}"
        )
    return _tables(rows, f"Stored GPU results from `docs/results/` ({why}):")


# -- pictures -----------------------------------------------------------------------------
def draw_grid(ax, values: np.ndarray, title: str, labels: np.ndarray | None = None, cmap: str = "tab20", **imshow) -> None:
    """An integer matrix as coloured cells (row 0 at the top), optionally labelled: the
    notebooks' pictures of which lane, block or thread owns which element."""
    ax.imshow(values, cmap=cmap, aspect="auto", interpolation="nearest", **imshow)
    if labels is not None:
        for (r, c), text in np.ndenumerate(labels):
            ax.text(c, r, str(text), ha="center", va="center", fontsize=6)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
