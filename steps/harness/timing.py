"""The one timing function of the project.

GPU work is timed the way a decoding engine runs it: `calls` launches are captured in a
CUDA graph (which removes Python and launch overhead from the numbers) and the graph is
replayed; each replay is bracketed by CUDA events and divided by `calls`. The launches
rotate over several copies of the weights whose total size is several times the L2
cache, so each call streams its weights from HBM as a real decode step does. The result
is the median over many replays with the interquartile range as the spread.

If a launch cannot be captured in a graph, the same loop is timed eagerly with events
and the result says so. CPU work is timed with the host clock.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

TARGET_SAMPLE_SECONDS = 2e-3  # each timed sample covers about this much work
SAMPLES = 25
WARMUP_CALLS = 3


@dataclass(frozen=True)
class Timing:
    median_us: float
    q1_us: float
    q3_us: float
    samples: int
    calls_per_sample: int
    method: str  # "cuda-graph", "cuda-events" or "host-clock"

    @property
    def spread_pct(self) -> float:
        """Interquartile range as a percentage of the median."""
        return 100.0 * (self.q3_us - self.q1_us) / self.median_us if self.median_us else 0.0


def _summarise(per_call_us: list[float], calls: int, method: str) -> Timing:
    q1, med, q3 = statistics.quantiles(per_call_us, n=4, method="inclusive")
    return Timing(med, q1, q3, len(per_call_us), calls, method)


def measure(launch: Callable[[int], object], variants: int = 1, device: str = "cuda", samples: int = SAMPLES) -> Timing:
    """Time `launch(i)` (i cycles over `variants` weight copies); per-call median and IQR in us.

    `device` is "cuda" (the launches go to torch's current stream) or "cpu".
    """
    if samples < 2:
        raise ValueError(f"measure needs at least 2 samples for a median and a spread, got samples={samples}")
    if device == "cpu":
        return _measure_host(launch, variants, samples)
    return _measure_cuda(launch, variants, samples)


# How a GEMM timed with after_another_kernel's launch before it is labelled in results (e2e rows'
# linear_timing); rows without the label were timed back to back.
AFTER_ANOTHER_KERNEL = "after another kernel"


def after_another_kernel(x, device: str = "cuda") -> tuple[Callable[[], object], float]:
    """(launch, its own time in us) of a kernel that rewrites the tensor x in place (x *= 1) and
    knows nothing of programmatic dependent launches. Put before each timed launch, with its own
    time subtracted, it times a GEMM as a model runs it: after a norm, an activation or attention,
    so that no launch overlaps the one before it (rung 8's dependent launch does, back to back)."""
    launch = lambda: x.mul_(1.0)  # noqa: E731
    return launch, measure(lambda i: launch(), 1, device).median_us


def _agreed(calls: int) -> int:
    """The largest of every rank's call count under torch.distributed (tensor-parallel
    decoding), else `calls`: launches that hold collectives must run equally often on every
    rank, and each rank's first timing differs."""
    dist = sys.modules.get("torch.distributed")  # never imports torch for a NumPy-only measure
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return calls
    import torch

    count = torch.tensor([calls], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())


def _measure_host(launch: Callable[[int], object], variants: int, samples: int) -> Timing:
    for i in range(WARMUP_CALLS):
        launch(i % variants)
    t0 = time.perf_counter()
    launch(0)
    once = time.perf_counter() - t0
    calls = _agreed(max(1, math.ceil(TARGET_SAMPLE_SECONDS / max(once, 1e-9))))
    per_call = []
    for _ in range(samples):
        t0 = time.perf_counter()
        for j in range(calls):
            launch(j % variants)
        per_call.append((time.perf_counter() - t0) / calls * 1e6)
    return _summarise(per_call, calls, "host-clock")


def _event_loop_us(launch: Callable[[int], object], calls: int, variants: int) -> float:
    import torch

    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for j in range(calls):
        launch(j % variants)
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) * 1e3 / calls


def _measure_cuda(launch: Callable[[int], object], variants: int, samples: int) -> Timing:
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compilation, module load, first-touch
        for i in range(max(WARMUP_CALLS, variants)):
            launch(i % variants)
        once_us = _event_loop_us(launch, variants, variants)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    calls = max(variants, math.ceil(TARGET_SAMPLE_SECONDS * 1e6 / max(once_us, 1e-3)))
    calls = variants * math.ceil(_agreed(calls) / variants)  # every copy equally often
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for j in range(calls):
                launch(j % variants)
    except Exception:  # a launch that cannot be captured: time it eagerly instead
        torch.cuda.synchronize()
        per_call = [_event_loop_us(launch, calls, variants) for _ in range(samples)]
        return _summarise(per_call, calls, "cuda-events")
    graph.replay()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    per_call = []
    for _ in range(samples):
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        per_call.append(start.elapsed_time(stop) * 1e3 / calls)
    del graph
    return _summarise(per_call, calls, "cuda-graph")
