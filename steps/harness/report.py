"""Turn committed benchmark data (docs/results/*.jsonl) into tables and plots.

Nothing in the README's results section is typed by hand: this module rewrites it from
the JSON lines, and rerunning it on the same data reproduces the same bytes (rows are
sorted, the plots carry no timestamp). Results are shown GPU by GPU, the GPU that joined
the results last first, each with two pictures: speedup over FP16 by batch size, and a
waterfall of where the speedup comes from, one bar per rung's idea. A rung has the same
colour in every plot (`RUNG_COLOURS`).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import tempfile
import zlib
from collections import defaultdict
from pathlib import Path

from .bench import BASELINE_TITLES
from .timing import AFTER_ANOTHER_KERNEL

START, END = "<!-- results:start -->", "<!-- results:end -->"

# One colour per rung in every plot, by name, so a rung keeps its colour whichever rungs a
# plot shows (and rungs that are planned have theirs already). FP16 is the grey reference.
RUNG_COLOURS = {
    "fp16": "#7f7f7f",
    "s0_numpy": "#8c564b",
    "s1_numba_naive": "#e377c2",
    "s2_smem_tiling": "#bcbd22",
    "s3_tensor_cores": "#17becf",
    "s4_marlin_layout": "#9467bd",
    "s5_async_pipeline": "#ff7f0e",
    "s6_marlin": "#1f77b4",
    "s7_sparse_marlin": "#2ca02c",
    "s8_hopper": "#d62728",
}
# Anything else a plot shows (a peer library's kernel): a dark colour chosen by its name.
OTHER_COLOURS = ("#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd")
FLOOR_COLOUR = "black"
# The waterfall's batch size: decode batches, where the paper's kernels are memory-bound.
WATERFALL_M = 16


def rung_colour(name: str) -> str:
    """The colour of rung (or baseline, or peer) `name` in every plot."""
    return RUNG_COLOURS.get(name) or OTHER_COLOURS[zlib.crc32(name.encode()) % len(OTHER_COLOURS)]


def is_sparse(rung: str) -> bool:
    """Whether a rung streams 2:4-sparse weights (3 bits per weight instead of 4)."""
    return "sparse" in rung


def load_rows(results_dir: Path) -> list[dict]:
    """All rows, keeping for each (gpu, preset, shape, M, group, rung) only the newest."""
    newest: dict[tuple, dict] = {}
    for path in sorted(results_dir.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            key = (row["gpu"], row["preset"], row["shape"], row["M"], row["group_size"], row["rung"])
            if key not in newest or row["date"] >= newest[key]["date"]:
                newest[key] = row
    return list(newest.values())


def gpus_newest_first(rows: list[dict]) -> list[str]:
    """The GPUs of `rows`, the one first measured most recently first: a GPU joins the
    results after the ones before it, and re-measuring an older GPU does not move it."""
    first: dict[str, str] = {}
    for r in rows:
        first[r["gpu"]] = min(first.get(r["gpu"], r["date"]), r["date"])
    return sorted(first, key=lambda gpu: (first[gpu], gpu), reverse=True)


def gpu_slug(gpu: str) -> str:
    """A GPU's name as a file name part: 'NVIDIA H100 80GB HBM3' -> 'NVIDIA_H100_80GB_HBM3'."""
    return re.sub(r"\W+", "_", gpu).strip("_")


def _rung_order(rows: list[dict]) -> list[str]:
    from ..registry import STEPS

    names = [*BASELINE_TITLES] + [s.name for s in STEPS]
    present = {r["rung"] for r in rows}
    return [n for n in names if n in present] + sorted(present - set(names))


def all_groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows grouped by (gpu, preset, shape, group), the newest GPU's first, then sorted."""
    rank = {gpu: i for i, gpu in enumerate(gpus_newest_first(rows))}
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["gpu"], r["preset"], r["shape"], r["group_size"])].append(r)
    return dict(sorted(groups.items(), key=lambda item: (rank[item[0][0]], item[0])))


def headline_groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """all_groups, keeping one shape per preset: the single shape of a one-shape preset,
    or the 'sum' over a model's layers."""
    groups = all_groups(rows)
    has_sum = {(g, p, gs) for (g, p, s, gs) in groups if s == "sum"}
    return {k: v for k, v in groups.items() if k[2] == "sum" or (k[0], k[1], k[3]) not in has_sum}


def floor_us(rows: list[dict], M: int, sparse: bool) -> float | None:
    """The memory floor at batch M of one shape's rows: the weight bytes of a dense (or
    2:4-sparse) rung over the read bandwidth measured in the same run; None if no such row."""
    row = next((r for r in rows if r["M"] == M and r["rung"] not in BASELINE_TITLES and is_sparse(r["rung"]) == sparse), None)
    return None if row is None else row["weight_bytes"] / (row["read_bw_gbps"] * 1e3)


def markdown_table(rows: list[dict]) -> str:
    Ms = sorted({r["M"] for r in rows})
    by = {(r["rung"], r["M"]): r for r in rows}
    lines = ["| rung | " + " | ".join(f"M={m}" for m in Ms) + " |", "|---|" + "---:|" * len(Ms)]
    for rung in _rung_order(rows):
        cells = []
        for m in Ms:
            r = by.get((rung, m))
            cells.append("" if r is None else f"{r['us']:.1f} µs · {r['speedup_vs_fp16']:.2f}× · {r['pct_of_read_bw']:.0f}%")
        lines.append(f"| {rung} | " + " | ".join(cells) + " |")
    # The byte floors: the dense rungs stream 4-bit codes, the 2:4 rung 3 bits per weight.
    for label, sparse in (("int4", False), ("2:4 sparse int4", True)):
        floors = [floor_us(rows, m, sparse) for m in Ms]
        if any(f is not None for f in floors):
            lines.append(f"| floor: {label} bytes / read bandwidth | " + " | ".join("" if f is None else f"{f:.1f} µs" for f in floors) + " |")
    return "\n".join(lines)



def _figure(panels: int, width: float, height: float):
    """A row of `panels` axes on a Figure that no pyplot state holds, so plotting leaves the
    caller's matplotlib backend (a notebook's inline one) as it was."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * panels, height), layout="tight")
    return fig, fig.subplots(1, panels, squeeze=False)[0]


def _speedup_axes(
    ax, curves: dict[str, list[tuple[int, float]]], xlabel: str, ylabel: str, title: str,
    colours: dict[str, str] | None = None, legend_outside: bool = False,
) -> None:  # fmt: skip
    """One line per curve of (batch, speedup) points, log2 batch axis, legend (beside the axes
    when there are too many curves to keep it off them) and grid. Curves are coloured by
    `colours` (label -> colour), else by a palette that uses no colour twice."""
    import matplotlib

    palette = matplotlib.colormaps["tab20" if len(curves) > 10 else "tab10"].colors
    for i, (label, pts) in enumerate(curves.items()):
        pts = sorted(pts)
        colour = colours[label] if colours else palette[i % len(palette)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label, color=colour)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    if legend_outside:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    else:
        ax.legend(fontsize=7)


# Metadata naming the tool's version, per format that has any; dates are pinned through
# SOURCE_DATE_EPOCH, which matplotlib honours for every format (PostScript has no other way).
# Without both, regenerating a plot would not reproduce the same bytes.
_NO_STAMP = {"png": {"Software": None}, "svg": {"Date": None, "Creator": None},
             "pdf": {"CreationDate": None, "Producer": None, "Creator": None},
             "ps": {"Creator": "matplotlib"}, "eps": {"Creator": "matplotlib"}}  # fmt: skip


def plot_format(path: Path) -> str:
    """The matplotlib format that `path`'s suffix names; ValueError listing the formats when none."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    formats = FigureCanvasAgg.get_supported_filetypes()
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in formats:
        raise ValueError(f"cannot write a plot to {path}: the file name must end in one of .{', .'.join(sorted(formats))}")
    return fmt


def _save(fig, path: Path) -> None:
    """Write a figure without a timestamp, in the format its suffix names, all or nothing: it
    is written under its own name in a temporary folder beside `path` and moved into place,
    so a failure leaves no broken file."""
    import matplotlib

    fmt = plot_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pinned = os.environ.get("SOURCE_DATE_EPOCH")
    os.environ["SOURCE_DATE_EPOCH"] = "0"
    try:
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as scratch:
            whole = Path(scratch) / path.name
            with matplotlib.rc_context({"svg.hashsalt": "marlin-ladder"}):  # SVG ids are random hashes otherwise
                if fmt == "svgz":  # matplotlib's gzip header carries the time: compress here, without it
                    svg = io.BytesIO()
                    fig.savefig(svg, format="svg", dpi=110, metadata=_NO_STAMP["svg"])
                    whole.write_bytes(gzip.compress(svg.getvalue(), mtime=0))
                else:
                    fig.savefig(whole, format=fmt, dpi=110, metadata=_NO_STAMP.get(fmt))
            whole.replace(path)
    finally:
        if pinned is None:
            del os.environ["SOURCE_DATE_EPOCH"]
        else:
            os.environ["SOURCE_DATE_EPOCH"] = pinned


def _panel_title(key: tuple) -> str:
    gpu, preset, shape, g = key
    return f"{gpu}\n{preset} ({'sum of its layers' if shape == 'sum' else shape}), group {g}"


def speedup_figure(rows: list[dict]):
    """Speedup over FP16 against batch size, one line per rung, one panel per headline shape."""
    groups = headline_groups(rows)
    fig, axes = _figure(len(groups), 5.5, 4.2)
    for ax, (key, rs) in zip(axes, groups.items()):
        curves = {rung: [(r["M"], r["speedup_vs_fp16"]) for r in rs if r["rung"] == rung] for rung in _rung_order(rs)}
        baseline = next((BASELINE_TITLES[r["rung"]] for r in rs if r["rung"] in BASELINE_TITLES), "FP16 cuBLAS")
        _speedup_axes(ax, curves, "batch size M", f"speedup over {baseline}", _panel_title(key),
                      colours={rung: rung_colour(rung) for rung in curves})  # fmt: skip
        ax.set_yscale("log", base=2)
    return fig


def plot_speedup(rows: list[dict], path: Path) -> None:
    """speedup_figure, written to `path`."""
    _save(speedup_figure(rows), path)


def waterfall_batch(rows: list[dict]) -> int:
    """The batch size a shape's waterfall shows: WATERFALL_M where it was measured, else
    the batch size with the most rungs measured (the smallest of those)."""
    counts = defaultdict(int)
    for r in rows:
        counts[r["M"]] += r["rung"] not in BASELINE_TITLES
    return WATERFALL_M if counts.get(WATERFALL_M) else min(counts, key=lambda m: (-counts[m], m))


def waterfall_steps(rows: list[dict], M: int) -> list[tuple[str, float, float]]:
    """(rung, time before its idea, time after) at batch M, in ladder order, from rung 1 (or,
    where rung 1 was not measured, the slowest rung) to the last rung measured. A rung builds on
    the dense rung before it: a 2:4-sparse rung is a branch off it, not the base of the next."""
    times = {r["rung"]: r["us"] for r in rows if r["M"] == M and r["rung"] not in BASELINE_TITLES}
    chain = [rung for rung in _rung_order(rows) if rung in times]
    if not chain:
        return []
    start = chain.index("s1_numba_naive") if "s1_numba_naive" in chain else max(range(len(chain)), key=lambda i: times[chain[i]])
    chain = chain[start:]
    steps, base = [(chain[0], times[chain[0]], times[chain[0]])], times[chain[0]]
    for rung in chain[1:]:
        steps.append((rung, base, times[rung]))
        if not is_sparse(rung):
            base = times[rung]
    return steps


def waterfall_figure(rows: list[dict]):
    """Where the speedup comes from, one panel per headline shape: the first bar is the
    starting rung's time, each later bar spans the time before and after one rung's idea
    (hatched where the idea cost time at this batch size), with the FP16 time and the
    memory floors drawn across. Log time axis, so a bar's length is the factor it bought."""
    from matplotlib.ticker import FuncFormatter

    groups = headline_groups(rows)
    fig, axes = _figure(len(groups), 5.5, 5.0)
    for ax, (key, rs) in zip(axes, groups.items()):
        M = waterfall_batch(rs)
        steps = waterfall_steps(rs, M)
        bottom = min([after for _, _, after in steps] + [f for s in (False, True) if (f := floor_us(rs, M, s))]) / 2
        for x, (rung, before, after) in enumerate(steps):
            low, high = (bottom, after) if x == 0 else sorted((before, after))
            ax.bar(x, high - low, bottom=low, color=rung_colour(rung), hatch="//" if after > before else None,
                   edgecolor="white" if after > before else rung_colour(rung))  # fmt: skip
            label = f"{after:,.0f} µs" if x == 0 else f"{before / after:.2g}×"
            ax.annotate(label, (x, after), xytext=(0, -9 if after < before or x == 0 else 3),
                        textcoords="offset points", ha="center", fontsize=7)  # fmt: skip
        fp16 = next((r["us"] for r in rs if r["M"] == M and r["rung"] == "fp16"), None)
        lines = [("fp16 cuBLAS", fp16, rung_colour("fp16"), "-"), ("floor: int4 bytes", floor_us(rs, M, False), FLOOR_COLOUR, "--"),
                 ("floor: 2:4 sparse bytes", floor_us(rs, M, True), FLOOR_COLOUR, ":")]  # fmt: skip
        for label, us, colour, style in lines:
            if us is not None:
                ax.axhline(us, color=colour, ls=style, lw=1, label=f"{label}: {us:,.1f} µs")
        ax.set_yscale("log")
        ax.set_ylim(bottom=bottom)
        # Plain numbers on the time axis, the minor ticks labelled at 2 and 5 times a power of ten.
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
        ax.tick_params(axis="y", which="both", labelsize=7)
        ax.set_xticks(range(len(steps)), [rung.replace("_", "\n") for rung, _, _ in steps], fontsize=7)
        ax.set_ylabel(f"time at M = {M} (µs)")
        ax.set_title(f"where the speedup comes from: {_panel_title(key)}", fontsize=9)
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, frameon=False)
    return fig


def results_markdown(rows: list[dict], plots: str, groups_of=headline_groups, level: int = 3) -> str:
    """GPU by GPU, the newest first and the earlier ones under one heading after it: each
    GPU's speedup plot and waterfall (files in folder `plots`, as `write_report` names them)
    and one table per group (`groups_of`: headline_groups or all_groups)."""
    parts = [
        "Each cell: median time · speedup over FP16 cuBLAS measured in the same run · "
        "weight bandwidth as a share of the streaming-read bandwidth measured in the same run. "
        f"The waterfalls show where the speedup comes from at M = {WATERFALL_M}: each bar is one rung's idea, "
        "from the time before it to the time after it (log scale, so a bar's length is the factor it bought).",
    ]
    for i, gpu in enumerate(gpus_newest_first(rows)):
        if i == 1:
            parts += ["", f"{'#' * level} Earlier GPUs"]
        mine = [r for r in rows if r["gpu"] == gpu]
        parts += ["", f"{'#' * (level + (i > 0))} {gpu}"]
        for name, what, _ in PICTURES:
            parts += ["", f"![{what} on the {gpu}]({plots}{name}_{gpu_slug(gpu)}.png)"]
        for (_, preset, shape, g), rs in groups_of(mine).items():
            dates = sorted({r["date"][:10] for r in rs})
            versions = rs[0].get("versions", {})
            parts += [
                "",
                f"Preset `{preset}` ({'sum of its layers' if shape == 'sum' else shape}), group size {g}, "
                f"measured {', '.join(dates)}; torch {versions.get('torch', '?')}, CuPy {versions.get('cupy', '?')}",
                "",
                markdown_table(rs),
            ]
    return "\n".join(parts)


# The pictures of each GPU: file name stem, what it shows, the function that draws it.
PICTURES = (("ladder", "speedup over FP16 by batch size", speedup_figure),
            ("waterfall", "where the speedup comes from", waterfall_figure))  # fmt: skip


NCU_COLUMNS = {
    "gpu__time_duration.sum": ("time (µs)", 1e-3),
    "dram__bytes_read.sum": ("DRAM read (MB)", 1e-6),
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": ("DRAM throughput (% of peak)", 1.0),
    "sm__warps_active.avg.pct_of_peak_sustained_active": ("achieved occupancy (%)", 1.0),
    "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active": ("tensor pipe active (%)", 1.0),
    "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum": ("smem load bank conflicts", 1.0),
    "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum": ("smem store bank conflicts", 1.0),
    "launch__registers_per_thread": ("registers / thread", 1.0),
    "launch__grid_size": ("blocks", 1.0),
}


def ncu_markdown(path: Path) -> str:
    """One row per profiled kernel of an `ncu --csv` log, the columns of NCU_COLUMNS."""
    # ncu's CSV follows whatever the profiled program printed; it starts at its header row.
    text = path.read_text().splitlines()
    start = next((i for i, line in enumerate(text) if line.startswith('"ID"')), len(text))
    lines = [line for line in text[start:] if not line.startswith("==")]
    values: dict[str, dict[str, float]] = defaultdict(dict)
    for row in csv.DictReader(lines):
        if row["Metric Name"] in NCU_COLUMNS:
            kernel = row["Kernel Name"].split("(")[0].split("<")[0]
            values[f"{row['ID']}:{kernel}"][row["Metric Name"]] = float(row["Metric Value"].replace(",", ""))
    head = "| kernel | " + " | ".join(label for label, _ in NCU_COLUMNS.values()) + " |"
    out = [head, "|---|" + "---:|" * len(NCU_COLUMNS)]
    for key, metrics in values.items():
        cells = [f"{metrics[m] * scale:,.1f}" if m in metrics else "" for m, (_, scale) in NCU_COLUMNS.items()]
        out.append(f"| {key.split(':', 1)[1]} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def write_profiles(results_dir: Path) -> None:
    """docs/results/profiles.md from every ncu_*.csv log (Nsight Compute, one launch per kernel)."""
    parts = ["# Nsight Compute profiles", "", "Generated by `python -m steps report` from the `*ncu*.csv` logs "
             "in this folder; each row is one launch profiled with `ncu --clock-control none` "
             "(see scripts/ncu_ladder.py for the workload)."]  # fmt: skip
    for path in sorted(results_dir.glob("*ncu*.csv")):
        parts += ["", f"## {path.stem}", "", ncu_markdown(path)]
    (results_dir / "profiles.md").write_text("\n".join(parts) + "\n")


def write_report(results_dir: Path, readme: Path) -> None:
    rows = [r for r in load_rows(results_dir) if r["device"] == "cuda"]
    if not rows:
        raise ValueError(f"no GPU results in {results_dir}/*.jsonl")
    text = readme.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{readme} has no {START} ... {END} section to fill")
    for gpu in gpus_newest_first(rows):
        mine = [r for r in rows if r["gpu"] == gpu]
        for name, _, figure in PICTURES:
            _save(figure(mine), results_dir / f"{name}_{gpu_slug(gpu)}.png")
    plots = results_dir.relative_to(readme.parent) if results_dir.is_relative_to(readme.parent) else results_dir
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{results_markdown(rows, f'{plots.as_posix()}/')}\n{END}{tail}")
    write_profiles(results_dir)
    write_e2e(results_dir / "e2e")
    page = "\n".join([
        "# Results",
        "",
        "Generated by `python -m steps report` from the `*.jsonl` files in this folder: every preset, "
        "each Llama layer on its own and summed. The README shows the headline rows; "
        "[profiles.md](profiles.md) the Nsight Compute profiles; [e2e/](e2e/README.md) end-to-end decoding; "
        "[../methodology.md](../methodology.md) how everything is measured.",
        "",
        results_markdown(rows, "", all_groups, level=2),
    ])  # fmt: skip
    (results_dir / "README.md").write_text(page + "\n")


# What each e2e run's decode attention ran on (steps.torch.e2e.attention_kind), as table titles say it.
ATTENTION_TITLES = {"transformers": "", "grouped": ", grouped decode attention",
                    "triton": ", grouped decode attention (Triton kernel)"}  # fmt: skip
E2E_COLUMNS = ("batch", "model", "step_us", "tokens_per_s", "speedup_vs_fp16", "linear_us", "attention_us", "rest_us")


def write_e2e(e2e_dir: Path) -> None:
    """docs/results/e2e/README.md and e2e.png from the `python -m steps e2e` JSON lines there."""
    files = {path.name: path for path in sorted(e2e_dir.glob("*.jsonl"))}
    rows = [(name, json.loads(line)) for name, path in files.items() for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    # One table per file and day: a file holds one run (or runs of one session), and two runs of one
    # day with the same configuration would otherwise share a table, each with its own FP16 row.
    # Keyed by (configuration, (day, file, how the linear layers were timed)).
    runs: dict[tuple[tuple, tuple], list[dict]] = defaultdict(list)
    for name, r in rows:
        config = (r["gpu"], r["dims"], r["layers"], r["group_size"], r.get("sparse", False), r.get("compiled", False),
                  r.get("fused", False), r.get("decode_attention", "transformers"), r.get("tp", 1))  # fmt: skip
        runs[(config, (r["date"][:10], name, r.get("linear_timing", "back to back")))].append(r)
    parts = [
        "# End-to-end decoding",
        "",
        "Generated by `python -m steps report` from the `python -m steps e2e` JSON lines in this folder "
        "(see steps/torch/e2e/ for the model, the timing and the breakdown). Times in µs per decode step; "
        "linear and attention are timed on their own, rest is the step minus both (an estimate). "
        "Linear layers are timed each after another kernel, as in the step, where the table says so; "
        "before that (tables without the note) back to back, where rung 8's dependent launch hides part "
        "of each launch's fixed cost and rest carries it.",
        "",
        "![decode speedup over FP16 by batch size](e2e.png)",
    ]
    for ((gpu, dims, layers, g, sparse, compiled, fused, attention, tp), (date, name, linear)), rs in sorted(runs.items()):
        weights = f", tensor-parallel over {tp} GPUs" if tp > 1 else ""
        weights += ", 2:4-sparse weights" if sparse else ""
        weights += ", q|k|v and gate|up fused" if fused else ""
        weights += ATTENTION_TITLES[attention]
        weights += ", decoder under torch.compile" if compiled else ""
        weights += ", linear layers timed each after another kernel" if linear == AFTER_ANOTHER_KERNEL else ""
        parts += ["", f"**{gpu}**, Llama-2 {dims} dimensions, {layers} layers, group size {g}{weights}, measured {date} "
                  f"(`{name}`)", ""]
        parts.append("| " + " | ".join(E2E_COLUMNS) + " |")
        parts.append("|---|---|" + "---:|" * (len(E2E_COLUMNS) - 2))
        for r in sorted(rs, key=lambda r: (r["batch"], r["model"] != "fp16", r["model"])):
            cells = [f"{r[c]:.2f}×" if c == "speedup_vs_fp16" else f"{r[c]:,.1f}" if isinstance(r[c], float) else str(r[c])
                     for c in E2E_COLUMNS]
            parts.append("| " + " | ".join(cells) + " |")
    (e2e_dir / "README.md").write_text("\n".join(parts) + "\n")

    fig, (ax,) = _figure(1, 9.5, 4)
    gpus = sorted({config[0] for config, _ in runs})
    # One curve per configuration: the runs of its files and days together (the step's time does
    # not depend on how its linear layers were timed for the breakdown).
    configs: dict[tuple, list[dict]] = defaultdict(list)
    for (config, _), rs in sorted(runs.items()):
        configs[config] += rs
    curves = {
        f"{dims}, {layers} layers, g{g}{f', TP {tp}' if tp > 1 else ''}{', 2:4' if sparse else ''}{', fused' if fused else ''}"
        f"{ATTENTION_TITLES[attention].replace(' decode', '')}{', compiled' if compiled else ''}, "
        f"{min(r['date'][:10] for r in rs)}" + (f", {gpu}" if len(gpus) > 1 else ""):
            sorted((r["batch"], r["speedup_vs_fp16"]) for r in rs if r["model"] != "fp16")
        for (gpu, dims, layers, g, sparse, compiled, fused, attention, tp), rs in configs.items()
    }  # fmt: skip
    ax.axhline(1.0, color="grey", lw=0.8)
    _speedup_axes(ax, curves, "batch size", "decode tokens/s over FP16",
                  f"{', '.join(gpus)}: MarlinLinear in every block linear layer (Llama-2 dims)",
                  legend_outside=True)  # fmt: skip
    _save(fig, e2e_dir / "e2e.png")
