"""Command line: `python -m steps {list,check,bench,e2e,generate,report}` (also `marlin-ladder ...`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import functools
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


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (batch sizes, counts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def writable_output(path: str, what: str) -> Path:
    """`path` with its folder created, checked before any work (ValueError when it cannot be written)."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"--{what} {path} is a folder; give a file name")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "a"):
            pass
    except OSError as e:
        raise ValueError(f"--{what} {path} cannot be written: {e.strerror}") from None
    return target


def cmd_bench(args: argparse.Namespace) -> int:
    device = "cpu" if args.cpu or not bench.gpu_present() else "cuda"
    presets = args.shapes or (["ideal"] if device == "cuda" else ["cpu-small"])
    batches = args.batch or (bench.GPU_BATCHES if device == "cuda" else bench.CPU_BATCHES)
    for preset in presets:  # every argument is checked before any work starts
        bench.preset_shapes(preset, 1 if device == "cuda" else None)
    bench.runnable_steps(device, args.rungs)
    if args.plot:
        from .report import plot_format

        plot_format(Path(args.plot))
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    if args.json:
        writable_output(args.json, "json")
    if device == "cpu":
        reason = "--cpu was given" if args.cpu else "no CUDA GPU here"
        where = "" if args.shapes else ", on a small shape"
        print(f"Benchmarking the CPU rungs only ({reason}){where}; the CUDA rungs need a GPU.")
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

            plot_speedup([json.loads(line) for line in bench.json_lines(rows, machine)], Path(args.plot))
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

    from ..torch import e2e, tp  # needs torch and transformers

    device = "cuda" if bench.gpu_present() else "cpu"
    config = e2e.E2EConfig(
        dims=args.dims or ("7b" if device == "cuda" else "tiny"), layers=args.layers,
        batches=tuple(args.batch or (bench.GPU_BATCHES if device == "cuda" else (1, 2))), new_tokens=args.tokens,
        prompt_len=args.prompt_len, group_size=args.group_size, rung=args.rung, seed=args.seed, sparse=args.sparse,
        compiled=args.compile, fused=args.fuse, tp=args.tp,
    )  # fmt: skip
    group = tp.init(args.tp, device) if args.tp > 1 else None
    lead = group is None or group.rank() == 0  # under tensor parallelism rank 0 speaks for all
    say = print if lead else (lambda *a, **k: None)
    if device == "cpu":
        say("No CUDA GPU here: the CPU rung on tiny dimensions checks the pipeline; real numbers need a GPU.")
    machine = bench.describe_machine(device)
    machine = dataclasses.replace(machine, versions={**machine.versions, "transformers": transformers.__version__})

    def save_batch(rows: list[e2e.Row]) -> None:
        # Written as each batch finishes: a run cut short by a time limit keeps what it measured.
        say(f"batch {rows[0].batch}: " + ", ".join(f"{r.model} {r.speedup_vs_fp16:.2f}x" for r in rows), flush=True)
        if args.json and lead:
            with open(args.json, "a") as f:
                f.writelines(line + "\n" for line in bench.json_lines(rows, machine))

    check, rows = e2e.run(machine, config, group, save_batch)
    say(e2e.format_check(check))
    if not check.passed:
        say("The MarlinLinear model failed its correctness check; nothing was timed.")
        return 1
    say(e2e.format_table(rows, machine))
    if any(r.method != "cuda-graph" for r in rows) and device == "cuda":
        say("Warning: some decode steps could not be captured in a CUDA graph and were timed eagerly (see method).")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    write_report(Path(args.results), Path(args.readme))
    return 0


def main(argv: list[str] | None = None) -> int:
    show_defaults = functools.partial(argparse.ArgumentParser, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser = show_defaults(prog="marlin-ladder", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=show_defaults)
    sub.add_parser("list", help="the rungs, and whether this machine can run each")
    check = sub.add_parser("check", help="check every available rung against the reference")
    check.add_argument("--seed", type=int, default=0, help="seed of the random problems")
    b = sub.add_parser("bench", help="benchmark the rungs side by side with the FP16 baseline")
    b.add_argument("--shapes", action="append", help="ideal, llama-7b, llama-70b, cpu-small or K,N[;K,N]; repeatable")
    b.add_argument("--batch", type=positive_int, nargs="+", action="extend",
                   help="batch sizes M, repeatable (default 1 2 4 ... 128 on a GPU, 1 16 on a CPU)")
    b.add_argument("--rungs", nargs="+", action="extend", help="rung names, repeatable; each must run here (default: all this machine runs)")
    b.add_argument("--group-size", type=int, default=128, choices=(-1, 32, 64, 128), help="rows of K per scale (-1: one per column)")
    b.add_argument("--json", help="append JSON lines (with GPU, versions, date) to this file")
    b.add_argument("--plot", help="save a speedup-vs-batch plot here, in the format its suffix names (.png, .svg, .pdf, ...)")
    b.add_argument("--cpu", action="store_true", help="benchmark the CPU rungs even where a GPU is present")
    b.add_argument("--seed", type=int, default=0, help="seed of the random weights and activations")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    e = sub.add_parser("e2e", help="decode tokens/s of a Llama-architecture model with MarlinLinear layers vs FP16")
    e.add_argument("--dims", choices=("7b", "70b", "tiny"), help="model dimensions (default 7b on a GPU, tiny on a CPU)")
    e.add_argument("--layers", type=int, help="number of decoder layers (default: the model's own)")
    e.add_argument("--batch", type=positive_int, nargs="+", help="batch sizes (default 1 2 4 ... 128 on a GPU, 1 2 on a CPU)")
    e.add_argument("--tokens", type=int, default=32, help="new tokens decoded per sequence")
    e.add_argument("--prompt-len", type=positive_int, default=32, help="prompt tokens per sequence")
    e.add_argument("--group-size", type=int, default=128, choices=(-1, 32, 64, 128), help="rows of K per scale (-1: one per column)")
    e.add_argument("--rung", help="force this rung for the MarlinLinear layers (default: the fastest that runs)")
    e.add_argument("--sparse", action="store_true", help="prune the weights 2:4 (both models) and use sparse layers")
    e.add_argument("--compile", action="store_true", help="run both models' decode step under torch.compile(fullgraph=True)")
    e.add_argument("--fuse", action="store_true",
                   help="one q|k|v and one gate|up layer, grouped decode attention (both models), as serving engines run them")
    e.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel ranks: run under torchrun --nproc-per-node N (q|k|v, gate|up column-, o, down row-parallel)")
    e.add_argument("--json", help="append JSON lines (with GPU, versions, date) to this file")
    e.add_argument("--seed", type=int, default=0, help="seed of the random model and prompts")
    gen = sub.add_parser("generate", help="greedy decoding from a GPTQ/AWQ checkpoint directory, with tokens/s")
    gen.add_argument("--checkpoint", help="checkpoint directory: config.json with quantization_config, safetensors")
    gen.add_argument("--synthetic-7b", action="store_true",
                     help="write a random GPTQ checkpoint with Llama-2-7B dimensions to a temporary directory and decode it")
    gen.add_argument("--layers", type=int, help="decoder layers of the --synthetic-7b checkpoint (default 8 of 32)")
    gen.add_argument("--prompt", help="text, or token ids separated by spaces when the checkpoint has no tokenizer")
    gen.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens to decode")
    gen.add_argument("--device", help="cpu or cuda[:i] (default: cuda where present)")
    gen.add_argument("--rung", help="force this rung for the quantized layers (default: the fastest that runs)")
    gen.add_argument("--json", help="append a JSON line (GPU, versions, date, tokens/s) to this file")
    gen.add_argument("--seed", type=int, default=0, help="of the --synthetic-7b weights")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    r = sub.add_parser("report", help="regenerate the results tables and plots from docs/results/*.jsonl")
    r.add_argument("--results", default="docs/results", help="folder of the benchmark JSON lines")
    r.add_argument("--readme", default="README.md", help="README whose results section is rewritten")
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
