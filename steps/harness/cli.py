"""Command line: `python -m steps {list,check,bench,e2e,generate,report}` (also `marlin-ladder ...`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

from reference import error_excess, random_quantized_weight

from . import bench
from .._arrays import to_gpu, to_host
from ..registry import STEPS

CHECK_SHAPES = ((1, 256, 256, 128), (16, 512, 256, -1), (33, 1024, 512, 64), (5, 256, 512, 32))
SIMULATOR_SHAPES = ((2, 128, 64, 32),)  # a CUDA rung under Numba's simulator is slow


def cmd_list(args: argparse.Namespace) -> int:
    for i, step in enumerate(STEPS):
        ok = step.available()
        status = "available" if ok else f"unavailable: {ok.reason}"
        print(f"{i}  {step.name:<20} {step.device:<5} {step.title}\n   {step.idea}\n   [{status}]")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Every available rung against the reference on a few random problems."""
    rng = np.random.default_rng(args.seed)
    failures = 0
    for step in STEPS:
        if not step.available():
            print(f"{step.name:<20} skipped ({step.available().reason})")
            continue
        simulated = step.device == "cuda" and step.host_arrays
        for M, K, N, g in SIMULATOR_SHAPES if simulated else CHECK_SHAPES:
            if not step.supports(M, K, N, g):
                continue
            qw = random_quantized_weight(rng, K, N, g)
            A_host = rng.standard_normal((M, K), dtype=np.float32).astype(np.float16)
            packed = step.pack(qw)
            C = step(A_host if step.host_arrays else to_gpu(A_host), packed)
            ratio = error_excess(to_host(C), A_host, step.reference_weight(qw), step.error_c)
            verdict = "ok" if ratio <= 1 else "FAIL"
            failures += verdict != "ok"
            print(f"{step.name:<20} M={M:<4} K={K:<5} N={N:<5} group={g:<4} error/bound={ratio:.3f} {verdict}")
    return 1 if failures else 0


def cmd_bench(args: argparse.Namespace) -> int:
    device = "cpu" if args.cpu or not bench.gpu_present() else "cuda"
    presets = args.shapes or (["ideal"] if device == "cuda" else ["cpu-small"])
    batches = args.batch or (bench.GPU_BATCHES if device == "cuda" else bench.CPU_BATCHES)
    if device == "cpu":
        reason = "--cpu was given" if args.cpu else "no CUDA GPU here"
        print(f"Benchmarking the CPU rungs only ({reason}), on a small shape; the CUDA rungs need a GPU.")
    failed = False
    for preset in presets:
        machine, read_gbps, rows = bench.run(preset, batches, args.rungs, args.group_size, device, args.seed, not args.quiet)
        print(bench.format_table(rows, machine, read_gbps))
        failed |= any(r.method == "failed-check" for r in rows)
        if args.json:
            with open(args.json, "a") as f:
                f.writelines(line + "\n" for line in bench.json_lines(rows, machine))
        if args.plot:
            from .report import plot_speedup

            plot_speedup([r.__dict__ | {"gpu": machine.name} for r in rows], Path(args.plot))
    if failed:
        print("Some rung failed its correctness check on the benchmarked data; its time is not reported.")
    return 1 if failed else 0


def _require(command: str, modules: tuple[str, ...]) -> None:
    """A clear error, not a traceback, when an optional dependency of `command` is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(
            f"`python -m steps {command}` needs {' and '.join(missing)}: pip install {' '.join(missing)} "
            "(torch: the CPU build with pip install torch --index-url https://download.pytorch.org/whl/cpu, see README)"
        )


def cmd_generate(args: argparse.Namespace) -> int:
    _require("generate", ("torch", "transformers", "safetensors", "tqdm"))
    if (args.checkpoint is None) == (not args.synthetic_7b):
        raise ValueError("give either --checkpoint DIR or --synthetic-7b")
    from ..torch import generate

    try:
        return generate.run(args)
    except TypeError as e:  # a checkpoint tensor of the wrong dtype: one line, like the ValueErrors
        raise ValueError(str(e)) from e


def cmd_e2e(args: argparse.Namespace) -> int:
    _require("e2e", ("torch", "transformers"))
    import transformers

    from ..torch import e2e  # needs torch and transformers

    device = "cuda" if bench.gpu_present() else "cpu"
    dims = args.dims or ("7b" if device == "cuda" else "tiny")
    batches = tuple(args.batch or (bench.GPU_BATCHES if device == "cuda" else (1, 2)))
    if device == "cpu":
        print("No CUDA GPU here: the CPU rung on tiny dimensions checks the pipeline; real numbers need a GPU.")
    machine = bench.describe_machine(device)
    machine = dataclasses.replace(machine, versions={**machine.versions, "transformers": transformers.__version__})

    def save_batch(rows: list[e2e.Row]) -> None:
        # Written as each batch finishes: a run cut short by a time limit keeps what it measured.
        print(f"batch {rows[0].batch}: " + ", ".join(f"{r.model} {r.speedup_vs_fp16:.2f}x" for r in rows), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.writelines(line + "\n" for line in bench.json_lines(rows, machine))

    check, rows = e2e.run(machine, dims, args.layers, batches, args.tokens, args.prompt_len, args.group_size, args.rung, args.seed,
                          args.sparse, args.compile, args.fuse, save_batch)  # fmt: skip
    print(e2e.format_check(check))
    if not check.passed:
        print("The MarlinLinear model failed its correctness check; nothing was timed.")
        return 1
    print(e2e.format_table(rows, machine))
    if any(r.method != "cuda-graph" for r in rows) and device == "cuda":
        print("Warning: some decode steps could not be captured in a CUDA graph and were timed eagerly (see method).")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    write_report(Path(args.results), Path(args.readme))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="marlin-ladder", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the rungs, and whether this machine can run each")
    check = sub.add_parser("check", help="check every available rung against the reference")
    check.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("bench", help="benchmark the rungs side by side with the FP16 baseline")
    b.add_argument("--shapes", action="append", help="ideal, llama-7b, llama-70b, cpu-small or K,N[;K,N]; repeatable")
    b.add_argument("--batch", type=int, nargs="+", help="batch sizes M (default 1 2 4 ... 128 on a GPU, 1 16 on a CPU)")
    b.add_argument("--rungs", nargs="+", help="rung names (default: all this machine runs)")
    b.add_argument("--group-size", type=int, default=128, choices=(-1, 32, 64, 128))
    b.add_argument("--json", help="append JSON lines (with GPU, versions, date) to this file")
    b.add_argument("--plot", help="save a speedup-vs-batch plot (PNG) here")
    b.add_argument("--cpu", action="store_true", help="benchmark the CPU rungs even where a GPU is present")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    e = sub.add_parser("e2e", help="decode tokens/s of a Llama-architecture model with MarlinLinear layers vs FP16")
    e.add_argument("--dims", choices=("7b", "70b", "tiny"), help="model dimensions (default 7b on a GPU, tiny on a CPU)")
    e.add_argument("--layers", type=int, help="number of decoder layers (default: the model's own)")
    e.add_argument("--batch", type=int, nargs="+", help="batch sizes (default 1 2 4 ... 128 on a GPU, 1 2 on a CPU)")
    e.add_argument("--tokens", type=int, default=32, help="new tokens decoded per sequence")
    e.add_argument("--prompt-len", type=int, default=32)
    e.add_argument("--group-size", type=int, default=128, choices=(-1, 32, 64, 128))
    e.add_argument("--rung", help="force this rung for the MarlinLinear layers (default: the fastest that runs)")
    e.add_argument("--sparse", action="store_true", help="prune the weights 2:4 (both models) and use sparse layers")
    e.add_argument("--compile", action="store_true", help="run both models' decode step under torch.compile(fullgraph=True)")
    e.add_argument("--fuse", action="store_true",
                   help="one q|k|v and one gate|up layer, grouped decode attention (both models), as serving engines run them")
    e.add_argument("--json", help="append JSON lines (with GPU, versions, date) to this file")
    e.add_argument("--seed", type=int, default=0)
    gen = sub.add_parser("generate", help="greedy decoding from a GPTQ/AWQ checkpoint directory, with tokens/s")
    gen.add_argument("--checkpoint", help="checkpoint directory: config.json with quantization_config, safetensors")
    gen.add_argument("--synthetic-7b", action="store_true",
                     help="write a random GPTQ checkpoint with Llama-2-7B dimensions to a temporary directory and decode it")
    gen.add_argument("--layers", type=int, help="decoder layers of the --synthetic-7b checkpoint (default 8 of 32)")
    gen.add_argument("--prompt", help="text, or token ids separated by spaces when the checkpoint has no tokenizer")
    gen.add_argument("--max-new-tokens", type=int, default=32, help="tokens to decode (default 32)")
    gen.add_argument("--device", help="cpu or cuda[:i] (default: cuda where present)")
    gen.add_argument("--rung", help="force this rung for the quantized layers (default: the fastest that runs)")
    gen.add_argument("--json", help="append a JSON line (GPU, versions, date, tokens/s) to this file")
    gen.add_argument("--seed", type=int, default=0, help="of the --synthetic-7b weights (default 0)")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    r = sub.add_parser("report", help="regenerate the results tables and plots from docs/results/*.jsonl")
    r.add_argument("--results", default="docs/results")
    r.add_argument("--readme", default="README.md")
    args = parser.parse_args(argv)
    handler = {"list": cmd_list, "check": cmd_check, "bench": cmd_bench, "e2e": cmd_e2e, "generate": cmd_generate,
               "report": cmd_report}[args.command]
    try:
        return handler(args)
    except (ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
