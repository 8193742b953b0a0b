"""Turn committed benchmark data (docs/results/*.jsonl) into tables and plots.

Nothing in the README's results section is typed by hand: this module rewrites it from
the JSON lines, and rerunning it on the same data reproduces the same bytes (rows are
sorted, the plot carries no timestamp).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

from .bench import BASELINE_TITLES

START, END = "<!-- results:start -->", "<!-- results:end -->"


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


def _rung_order(rows: list[dict]) -> list[str]:
    from ..registry import STEPS

    names = [*BASELINE_TITLES] + [s.name for s in STEPS]
    present = {r["rung"] for r in rows}
    return [n for n in names if n in present] + sorted(present - set(names))


def all_groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows grouped by (gpu, preset, shape, group), sorted."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["gpu"], r["preset"], r["shape"], r["group_size"])].append(r)
    return dict(sorted(groups.items()))


def headline_groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """all_groups, keeping one shape per preset: the single shape of a one-shape preset,
    or the 'sum' over a model's layers."""
    groups = all_groups(rows)
    has_sum = {(g, p, gs) for (g, p, s, gs) in groups if s == "sum"}
    return {k: v for k, v in groups.items() if k[2] == "sum" or (k[0], k[1], k[3]) not in has_sum}


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
    for label, pick in (("int4", lambda r: "sparse" not in r["rung"]), ("2:4 sparse int4", lambda r: "sparse" in r["rung"])):
        floors = []
        for m in Ms:
            row = next((r for r in rows if r["M"] == m and r["rung"] not in BASELINE_TITLES and pick(r)), None)
            floors.append("" if row is None else f"{row['weight_bytes'] / (row['read_bw_gbps'] * 1e3):.1f} µs")
        if any(floors):
            lines.append(f"| floor: {label} bytes / read bandwidth | " + " | ".join(floors) + " |")
    return "\n".join(lines)


def _speedup_axes(
    ax, curves: dict[str, list[tuple[int, float]]], xlabel: str, ylabel: str, title: str, legend_outside: bool = False
) -> None:
    """One line per curve of (batch, speedup) points, log2 batch axis, legend (beside the axes
    when there are too many curves to keep it off them) and grid."""
    import matplotlib

    colors = matplotlib.colormaps["tab20" if len(curves) > 10 else "tab10"].colors  # no colour used twice
    for (label, pts), color in zip(curves.items(), colors * (len(curves) // len(colors) + 1)):
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label, color=color)
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
    import matplotlib.pyplot as plt

    fmt = plot_format(path)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    pinned = os.environ.get("SOURCE_DATE_EPOCH")
    os.environ["SOURCE_DATE_EPOCH"] = "0"
    try:
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as scratch:
            whole = Path(scratch) / path.name
            with plt.rc_context({"svg.hashsalt": "marlin-ladder"}):  # SVG ids are random hashes otherwise
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
        plt.close(fig)


def plot_speedup(rows: list[dict], path: Path) -> None:
    """Speedup over FP16 against batch size, one line per rung, one panel per shape group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = headline_groups(rows)
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.2), squeeze=False)
    for ax, ((gpu, preset, shape, g), rs) in zip(axes[0], groups.items()):
        curves = {rung: [(r["M"], r["speedup_vs_fp16"]) for r in rs if r["rung"] == rung] for rung in _rung_order(rs)}
        baseline = next((BASELINE_TITLES[r["rung"]] for r in rs if r["rung"] in BASELINE_TITLES), "FP16 cuBLAS")
        _speedup_axes(ax, curves, "batch size M", f"speedup over {baseline}", f"{gpu}\n{preset} ({shape}), group {g}")
        ax.set_yscale("log", base=2)
    _save(fig, path)


def results_markdown(rows: list[dict], plot_name: str, groups: dict[tuple, list[dict]] | None = None) -> str:
    """The plot and one table per group (default: the headline groups)."""
    parts = [
        f"![speedup over FP16 by batch size]({plot_name})",
        "",
        "Each cell: median time · speedup over FP16 cuBLAS measured in the same run · "
        "weight bandwidth as a share of the streaming-read bandwidth measured in the same run.",
    ]
    for (gpu, preset, shape, g), rs in (groups or headline_groups(rows)).items():
        dates = sorted({r["date"][:10] for r in rs})
        versions = rs[0].get("versions", {})
        parts += [
            "",
            f"**{gpu}**, preset `{preset}` ({'sum of its layers' if shape == 'sum' else shape}), group size {g}, "
            f"measured {', '.join(dates)}; torch {versions.get('torch', '?')}, CuPy {versions.get('cupy', '?')}",
            "",
            markdown_table(rs),
        ]
    return "\n".join(parts)


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
    plot = results_dir / "ladder.png"
    plot_speedup(rows, plot)
    rel_plot = plot.relative_to(readme.parent) if plot.is_relative_to(readme.parent) else plot
    text = readme.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{readme} has no {START} ... {END} section to fill")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{results_markdown(rows, str(rel_plot))}\n{END}{tail}")
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
        results_markdown(rows, plot.name, all_groups(rows)),
    ])  # fmt: skip
    (results_dir / "README.md").write_text(page + "\n")


# What each e2e run's decode attention ran on (steps.torch.e2e.attention_kind), as table titles say it.
ATTENTION_TITLES = {"transformers": "", "grouped": ", grouped decode attention",
                    "triton": ", grouped decode attention (Triton kernel)"}  # fmt: skip
E2E_COLUMNS = ("batch", "model", "step_us", "tokens_per_s", "speedup_vs_fp16", "linear_us", "attention_us", "rest_us")


def write_e2e(e2e_dir: Path) -> None:
    """docs/results/e2e/README.md and e2e.png from the `python -m steps e2e` JSON lines there."""
    rows = [json.loads(line) for path in sorted(e2e_dir.glob("*.jsonl")) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    runs: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        runs[(r["gpu"], r["dims"], r["layers"], r["group_size"], r.get("sparse", False), r.get("compiled", False),
              r.get("fused", False), r.get("decode_attention", "transformers"),
              r["date"][:10])].append(r)  # fmt: skip
    parts = [
        "# End-to-end decoding",
        "",
        "Generated by `python -m steps report` from the `python -m steps e2e` JSON lines in this folder "
        "(see steps/torch/e2e.py for the model, the timing and the breakdown). Times in µs per decode step; "
        "linear and attention are timed on their own, rest is the step minus both (an estimate).",
        "",
        "![decode speedup over FP16 by batch size](e2e.png)",
    ]
    for (gpu, dims, layers, g, sparse, compiled, fused, attention, date), rs in sorted(runs.items()):
        weights = ", 2:4-sparse weights" if sparse else ""
        weights += ", q|k|v and gate|up fused" if fused else ""
        weights += ATTENTION_TITLES[attention]
        weights += ", decoder under torch.compile" if compiled else ""
        parts += ["", f"**{gpu}**, Llama-2 {dims} dimensions, {layers} layers, group size {g}{weights}, measured {date}", ""]
        parts.append("| " + " | ".join(E2E_COLUMNS) + " |")
        parts.append("|---|---|" + "---:|" * (len(E2E_COLUMNS) - 2))
        for r in sorted(rs, key=lambda r: (r["batch"], r["model"] != "fp16", r["model"])):
            cells = [f"{r[c]:.2f}×" if c == "speedup_vs_fp16" else f"{r[c]:,.1f}" if isinstance(r[c], float) else str(r[c])
                     for c in E2E_COLUMNS]
            parts.append("| " + " | ".join(cells) + " |")
    (e2e_dir / "README.md").write_text("\n".join(parts) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 4))
    gpus = sorted({key[0] for key in runs})
    # One curve per configuration: a run that crossed midnight (UTC) is two tables but one curve.
    configs: dict[tuple, list[dict]] = defaultdict(list)
    for key, rs in sorted(runs.items()):
        configs[key[:-1]] += rs
    curves = {
        f"{dims}, {layers} layers, g{g}{', 2:4' if sparse else ''}{', fused' if fused else ''}"
        f"{ATTENTION_TITLES[attention].replace(' decode', '')}{', compiled' if compiled else ''}, "
        f"{min(r['date'][:10] for r in rs)}" + (f", {gpu}" if len(gpus) > 1 else ""):
            sorted((r["batch"], r["speedup_vs_fp16"]) for r in rs if r["model"] != "fp16")
        for (gpu, dims, layers, g, sparse, compiled, fused, attention), rs in configs.items()
    }  # fmt: skip
    ax.axhline(1.0, color="grey", lw=0.8)
    _speedup_axes(ax, curves, "batch size", "decode tokens/s over FP16",
                  f"{', '.join(gpus)}: MarlinLinear in every block linear layer (Llama-2 dims)",
                  legend_outside=True)  # fmt: skip
    _save(fig, e2e_dir / "e2e.png")
