"""Two benchmark runs side by side: median time before and after, per shape, batch and rung
(rows both runs have), with each run's interquartile spread so that a change can be told
from noise. Writes Markdown to stdout.

Usage: python scripts/compare_runs.py BEFORE.jsonl AFTER.jsonl [BEFORE2 AFTER2 ...]
"""

import json
import sys
from pathlib import Path


def rows(path: Path) -> dict[tuple, dict]:
    found = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        found[(r["shape"], r["M"], r["rung"])] = r
    return found


def spread(r: dict) -> float:
    return 100.0 * (r["q3_us"] - r["q1_us"]) / r["us"]


def table(before_path: Path, after_path: Path) -> str:
    before, after = rows(before_path), rows(after_path)
    common = [key for key in before if key in after]
    first = before[common[0]]
    out = [
        f"### `{first['preset']}`: {before_path.name} → {after_path.name}",
        "",
        f"{first['gpu']}; before measured {first['date'][:16]}, after {after[common[0]]['date'][:16]} (UTC).",
        "",
        "| shape | M | rung | before µs (IQR %) | after µs (IQR %) | change | × FP16 before → after |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for key in sorted(common, key=lambda k: (k[0] != "sum", k[0], k[1], k[2])):
        b, a = before[key], after[key]
        if b["rung"] == "fp16":
            continue
        change = 100.0 * (a["us"] / b["us"] - 1)
        out.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {b['us']:.1f} ({spread(b):.1f}) | {a['us']:.1f} ({spread(a):.1f}) "
            f"| {change:+.1f} % | {b['speedup_vs_fp16']:.2f} → {a['speedup_vs_fp16']:.2f} |"
        )
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    paths = [Path(p) for p in sys.argv[1:]]
    if not paths or len(paths) % 2:
        sys.exit(__doc__)
    print("\n".join(table(paths[i], paths[i + 1]) for i in range(0, len(paths), 2)))
