"""Summarise Nsight Compute's per-instruction page (`ncu --import R --page source --csv
--print-source sass`): for each profiled kernel, where the warps stalled (sampled stall
reasons, in % of samples), the instructions executed per unit of work by opcode, and the
instructions that collected the most samples.

    python scripts/ncu_source_summary.py source.csv --per 17424 --top 12

`--per` divides the executed-instruction counts (e.g. by the number of weight tiles).
"""

import argparse
import collections
import csv
import sys


def kernels(path: str) -> list[tuple[list[str], list[list[str]]]]:
    found, header, rows = [], None, None
    for row in csv.reader(open(path, newline="")):
        if row and row[0] == "Kernel Name":
            rows = []
            found.append((row, rows))
        elif row and row[0] == "Address":
            header = row
        elif rows is not None and len(row) > 5:
            rows.append(row)
    return [(header, rows) for _, rows in found]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("csv")
    p.add_argument("--per", type=float, default=1.0)
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()
    for number, (header, rows) in enumerate(kernels(args.csv)):
        col = {name: i for i, name in enumerate(header)}
        samples = col["Warp Stall Sampling (All Samples)"]
        executed = col["Instructions Executed"]
        reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
        total = sum(int(r[samples]) for r in rows) or 1
        print(f"kernel {number}: {total} samples, {sum(int(r[executed]) for r in rows) / args.per:.0f} instructions per unit")
        by_reason = sorted(((sum(int(r[col[h]]) for r in rows), h[6:]) for h in reasons), reverse=True)
        print("  stalls: " + ", ".join(f"{name} {100 * n / total:.1f}%" for n, name in by_reason[:8]))
        mix = collections.Counter()
        for r in rows:
            words = r[1].split()
            opcode = words[1] if words[0].startswith("@") else words[0]
            mix[opcode.split(".")[0]] += int(r[executed])
        print("  per unit: " + ", ".join(f"{op} {n / args.per:.0f}" for op, n in mix.most_common(14)))
        for r in sorted(rows, key=lambda r: -int(r[samples]))[: args.top]:
            top = sorted(((int(r[col[h]]), h[6:]) for h in reasons if int(r[col[h]])), reverse=True)[:2]
            print(f"  {100 * int(r[samples]) / total:5.1f}%  {r[1].strip()[:56]:56s} {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
