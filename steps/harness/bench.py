"""The ladder benchmark: every rung this machine can run, side by side, with the FP16
baseline and the device's streaming-read bandwidth measured in the same process.

For each shape (K, N) one random quantized weight is drawn; each rung packs it once and
the packed arrays are copied until the copies together are several times the L2 cache,
so that timed calls stream weights from memory as in real decoding. For each batch size
M the activations are random; the output is poisoned with NaN, the rung runs once and
its result is checked against the reference on the same data before any time is taken.
Times come from `timing.measure` (CUDA-graph replay, median and IQR).

Columns: time; speedup over the baseline (FP16 cuBLAS through torch.matmul on a GPU, row
"fp16"; on a CPU a NumPy float32 product, row "numpy-fp32", named so in table, JSON and plot); effective weight bandwidth (the packed weight, scale and
metadata bytes a call must read, divided by its time); and that bandwidth as a share
of the streaming-read bandwidth measured in this run (a read-only reduction over a
buffer far larger than the L2: weights are only read, so a copy's figure is the wrong
ceiling).
"""

from __future__ import annotations

import datetime
import json
import math
import platform
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import numpy as np

from reference import QuantizedWeight, dequantize, error_excess, random_quantized_weight

from ..registry import STEPS
from ..step import Step
from .timing import Timing, measure

L2_MULTIPLE = 4  # rotate copies of the weights totalling at least this many L2 caches
CHECK_COLUMNS = 256  # columns of C checked against the CPU reference (all are checked for NaN)
READ_BUFFER_BYTES = 2 << 30

LLAMA_2_7B = ((4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096))
LLAMA_2_70B = ((8192, 10240), (8192, 8192), (8192, 57344), (28672, 8192))
CPU_SHAPES = ((1024, 1024),)
GPU_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
CPU_BATCHES = (1, 16)


@dataclass
class Row:
    """One line of results: a rung (or the baseline) at one shape and batch size."""

    preset: str
    shape: str
    K: int
    N: int
    M: int
    group_size: int
    rung: str
    us: float
    q1_us: float
    q3_us: float
    method: str
    speedup_vs_fp16: float
    weight_bytes: int
    weight_gbps: float
    read_bw_gbps: float
    pct_of_read_bw: float
    max_error_ratio: float


def preset_shapes(preset: str, sms: int | None) -> tuple[tuple[int, int], ...]:
    """(K, N) pairs of a preset: 'ideal', 'llama-7b', 'llama-70b', 'cpu-small' or 'K,N[;K,N]'."""
    if preset == "ideal":
        if sms is None:
            raise ValueError("the 'ideal' preset scales with the GPU's SM count and needs a GPU")
        return ((256 * sms, 128 * sms),)
    named = {"llama-7b": LLAMA_2_7B, "llama-70b": LLAMA_2_70B, "cpu-small": CPU_SHAPES}
    if preset in named:
        return named[preset]
    try:
        pairs = tuple(tuple(int(v) for v in part.split(",")) for part in preset.split(";"))
    except ValueError:
        pairs = ()
    if not pairs or any(len(p) != 2 or min(p) <= 0 for p in pairs):
        raise ValueError(f"unknown shape preset {preset!r}; use ideal, llama-7b, llama-70b, cpu-small or K,N[;K,N...]")
    return pairs  # type: ignore[return-value]


# -- the machine ------------------------------------------------------------------------
@dataclass
class Machine:
    device: str  # "cuda" or "cpu"
    name: str
    sms: int | None
    l2_bytes: int
    versions: dict[str, str]


def describe_machine(device: str) -> Machine:
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    for module in ("torch", "cupy", "numba"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            pass
    if device == "cpu":
        return Machine("cpu", platform.processor() or platform.machine(), None, 0, versions)
    import torch

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    versions["cuda_runtime"] = str(torch.version.cuda)
    try:
        import cupy

        versions["driver"] = str(cupy.cuda.runtime.driverGetVersion())
    except ImportError:
        pass
    return Machine("cuda", props.name, props.multi_processor_count, props.L2_cache_size, versions)


def gpu_present() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def measure_read_bandwidth(device: str) -> float:
    """Streaming-read bandwidth in GB/s: a sum over a buffer far larger than any cache."""
    if device == "cpu":
        buf = np.ones(READ_BUFFER_BYTES // 16 // 4, dtype=np.float32)
        t = measure(lambda i: buf.sum(), device="cpu", samples=7)
    else:
        import torch

        buf = torch.ones(READ_BUFFER_BYTES // 4, dtype=torch.float32, device="cuda")
        t = measure(lambda i: buf.sum(), device="cuda", samples=11)
    return buf.nbytes / (t.median_us * 1e-6) / 1e9


# -- one shape ------------------------------------------------------------------------
def copies_needed(nbytes: int, machine: Machine) -> int:
    if machine.device == "cpu":
        return 1
    return max(2, math.ceil(L2_MULTIPLE * machine.l2_bytes / max(nbytes, 1)))


def _copy_packed(packed: Any) -> Any:
    from dataclasses import replace

    return replace(packed, arrays={k: v.copy() for k, v in packed.arrays.items()})


def _check(C: Any, A_host: np.ndarray, W_deq: np.ndarray, c: float, rng: np.random.Generator) -> float:
    """max error / bound over a column subset (and inf if any output is not finite)."""
    C_host = C if isinstance(C, np.ndarray) else C.float().cpu().numpy() if hasattr(C, "cpu") else C.get()
    if not np.all(np.isfinite(C_host)):
        return float("inf")
    cols = np.sort(rng.choice(W_deq.shape[1], size=min(CHECK_COLUMNS, W_deq.shape[1]), replace=False))
    return error_excess(C_host[:, cols], A_host, W_deq[:, cols], c)


class ShapeBench:
    """Everything for one (K, N): the weights, their copies per rung, and the baseline."""

    def __init__(self, K: int, N: int, group_size: int, machine: Machine, rng: np.random.Generator):
        self.K, self.N, self.group_size, self.machine, self.rng = K, N, group_size, machine, rng
        self.qw: QuantizedWeight = random_quantized_weight(rng, K, N, group_size)
        self.W_deq = dequantize(self.qw)
        self._multiplied: dict[str, np.ndarray] = {}  # per rung: the fp16 weights it multiplies by
        if machine.device == "cpu":
            self.baseline_weights = [self.W_deq.astype(np.float32)]
        else:
            import torch

            w = torch.from_numpy(self.W_deq).cuda()
            self.baseline_weights = [w] + [w.clone() for _ in range(copies_needed(w.nbytes, machine) - 1)]

    def activations(self, M: int) -> tuple[np.ndarray, Any]:
        A_host = self.rng.standard_normal((M, self.K), dtype=np.float32).astype(np.float16)
        if self.machine.device == "cpu":
            return A_host, A_host
        import torch

        return A_host, torch.from_numpy(A_host).cuda()

    def time_baseline(self, A: Any) -> Timing:
        ws = self.baseline_weights
        if self.machine.device == "cpu":
            A32 = A.astype(np.float32)
            return measure(lambda i: (A32 @ ws[i]).astype(np.float16), len(ws), "cpu")
        import torch

        out = torch.empty((A.shape[0], self.N), dtype=torch.float16, device="cuda")
        return measure(lambda i: torch.matmul(A, ws[i], out=out), len(ws), "cuda")

    def packed_copies(self, step: Step) -> list[Any]:
        packed = step.pack(self.qw)
        return [packed] + [_copy_packed(packed) for _ in range(copies_needed(packed.streamed_bytes, self.machine) - 1)]

    def multiplied_weights(self, step: Step) -> np.ndarray:
        """The dequantized weights `step` multiplies by, computed once per rung (pruning for s7
        and dequantizing a large layer take seconds; every batch size reuses them)."""
        if step.name not in self._multiplied:
            multiplied = step.reference_weight(self.qw)
            self._multiplied[step.name] = self.W_deq if multiplied is self.qw else dequantize(multiplied)
        return self._multiplied[step.name]

    def run_step(self, step: Step, copies: list[Any], A_host: np.ndarray, A: Any) -> tuple[Timing, float]:
        M = A_host.shape[0]
        if self.machine.device == "cpu":
            out = np.full((M, self.N), np.nan, dtype=np.float16)
        else:
            import torch

            out = torch.full((M, self.N), float("nan"), dtype=torch.float16, device="cuda")
        step(A, copies[0], out=out)
        error = _check(out, A_host, self.multiplied_weights(step), step.error_c, self.rng)
        if not error <= 1.0:
            return Timing(math.nan, math.nan, math.nan, 0, 0, "failed-check"), error
        return measure(lambda i: step(A, copies[i], out=out), len(copies), self.machine.device), error


def _why_not_runnable(step: Step, device: str) -> str:
    """Why `step` cannot be benchmarked on `device` ("" when it can)."""
    if device == "cpu":
        return "" if step.device == "cpu" else "it runs on a CUDA GPU and this benchmark runs on the CPU"
    if step.device != "cuda":
        return "it runs on the CPU and this benchmark runs on the GPU (pass --cpu for the CPU rungs)"
    available = step.available()
    return "" if available else available.reason


def runnable_steps(device: str, names: Iterable[str] | None) -> list[Step]:
    """Every rung this machine runs, or exactly the rungs named (ValueError naming any that is
    unknown or cannot run here, and why)."""
    if names is None:
        return [s for s in STEPS if not _why_not_runnable(s, device)]
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in {s.name for s in STEPS}]
    if unknown:
        raise ValueError(f"unknown rung(s) {', '.join(unknown)}; the rungs are: {', '.join(s.name for s in STEPS)}")
    chosen = [s for s in STEPS if s.name in names]
    refused = [f"{s.name} ({why})" for s in chosen if (why := _why_not_runnable(s, device))]
    if refused:
        raise ValueError(f"cannot benchmark {'; '.join(refused)}")
    return chosen


def baseline_name(device: str) -> str:
    """The baseline row's rung label: FP16 cuBLAS on a GPU, a NumPy float32 product on a CPU."""
    return "fp16" if device == "cuda" else "numpy-fp32"


BASELINE_TITLES = {"fp16": "FP16 cuBLAS", "numpy-fp32": "NumPy float32 matmul"}


def run(
    preset: str,
    batches: Iterable[int],
    rung_names: Iterable[str] | None = None,
    group_size: int = 128,
    device: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[Machine, float, list[Row]]:
    """Benchmark the chosen rungs and the FP16 baseline; returns the machine, read GB/s and rows."""
    device = device or ("cuda" if gpu_present() else "cpu")
    machine = describe_machine(device)
    shapes = preset_shapes(preset, machine.sms)
    batches = tuple(batches)
    steps = runnable_steps(device, rung_names)
    rng = np.random.default_rng(seed)
    read_gbps = measure_read_bandwidth(device)
    rows: list[Row] = []
    bar = _progress(len(shapes) * len(batches) * (len(steps) + 1), progress)
    for K, N in shapes:
        bench = ShapeBench(K, N, group_size, machine, rng)
        copies = {s.name: bench.packed_copies(s) for s in steps if s.supports(max(batches), K, N, group_size)}
        for M in batches:
            A_host, A = bench.activations(M)
            base = bench.time_baseline(A)
            rows.append(_row(preset, K, N, M, group_size, baseline_name(device), base, base, 2 * K * N, read_gbps, 0.0))
            bar.update()
            for step in steps:
                if step.name in copies and step.supports(M, K, N, group_size):
                    t, err = bench.run_step(step, copies[step.name], A_host, A)
                    rows.append(_row(preset, K, N, M, group_size, step.name, t, base, copies[step.name][0].streamed_bytes, read_gbps, err))
                bar.update()
        del bench, copies
    bar.close()
    if len(shapes) > 1:
        rows += _summed_rows(rows, preset, read_gbps)
    return machine, read_gbps, rows


def _row(preset, K, N, M, g, rung, t: Timing, base: Timing, nbytes, read_gbps, err) -> Row:
    gbps = nbytes / (t.median_us * 1e-6) / 1e9
    return Row(
        preset, f"{K}x{N}", K, N, M, g, rung, t.median_us, t.q1_us, t.q3_us, t.method,
        base.median_us / t.median_us, nbytes, gbps, read_gbps, 100.0 * gbps / read_gbps, err,
    )  # fmt: skip


def _summed_rows(rows: list[Row], preset: str, read_gbps: float) -> list[Row]:
    """One 'sum' row per (rung, M): the layers of a model run one after another."""
    out = []
    for rung in dict.fromkeys(r.rung for r in rows):
        for M in dict.fromkeys(r.M for r in rows):
            mine = [r for r in rows if r.rung == rung and r.M == M]
            base = [r for r in rows if r.rung in BASELINE_TITLES and r.M == M]
            if len(mine) != len(base) or not mine:
                continue  # a rung that skipped a layer has no meaningful sum
            us, base_us = sum(r.us for r in mine), sum(r.us for r in base)
            nbytes = sum(r.weight_bytes for r in mine)
            gbps = nbytes / (us * 1e-6) / 1e9
            out.append(Row(
                preset, "sum", sum(r.K for r in mine), sum(r.N for r in mine), M, mine[0].group_size, rung,
                us, sum(r.q1_us for r in mine), sum(r.q3_us for r in mine), mine[0].method, base_us / us,
                nbytes, gbps, read_gbps, 100.0 * gbps / read_gbps, max(r.max_error_ratio for r in mine),
            ))  # fmt: skip
    return out


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        enabled = False
    if enabled:
        return tqdm(total=total, desc="bench", leave=False)

    class _Silent:
        def update(self, n: int = 1) -> None: ...
        def close(self) -> None: ...

    return _Silent()


# -- output ---------------------------------------------------------------------------
def format_table(rows: list[Row], machine: Machine, read_gbps: float) -> str:
    head = (f"{machine.name} ({machine.device}); streaming read {read_gbps:,.0f} GB/s measured in this run; "
            f"x base = speedup over the {BASELINE_TITLES[baseline_name(machine.device)]} baseline")  # fmt: skip
    cols = f"{'shape':>12} {'M':>4}  {'rung':<20} {'us':>9} {'IQR%':>5} {'x base':>7} {'GB/s':>8} {'%read':>6}"
    lines = [head, cols, "-" * len(cols)]
    for r in rows:
        lines.append(
            f"{r.shape:>12} {r.M:>4}  {r.rung:<20} {r.us:>9.1f} {100 * (r.q3_us - r.q1_us) / r.us:>5.1f} "
            f"{r.speedup_vs_fp16:>7.2f} {r.weight_gbps:>8.0f} {r.pct_of_read_bw:>6.1f}"
        )
    return "\n".join(lines)


def json_lines(rows: list[Row], machine: Machine) -> list[str]:
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    meta = {"date": stamp, "device": machine.device, "gpu": machine.name, "sms": machine.sms,
            "l2_bytes": machine.l2_bytes, "versions": machine.versions,
            "baseline": BASELINE_TITLES[baseline_name(machine.device)]}  # fmt: skip
    return [json.dumps({**meta, **asdict(r)}, sort_keys=True) for r in rows]
