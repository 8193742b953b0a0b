"""Reduction workspaces that concurrent launches never share: one per stream, one per captured graph.

Kernels that add partial sums across blocks (s6, s7, and any later rung that does) need
scratch memory for one launch: int32 arrival counters, zero between launches (each launch
leaves them zero again), and fp32 partial-sum slots. Two launches that run at the same
time must not share it. Launches on one stream run one after another, so one workspace per
(device, stream) is enough. A captured CUDA graph records the workspace's address and may
later be replayed on any stream, at the same time as eager launches or other graphs, so a
launch recorded during capture gets the workspace of its capture sequence (keyed by the
capture id), not its stream's: graphs captured one after another on torch's single
capture stream still get one workspace each, and launches inside one graph share it
(they are ordered on the capture stream).

Allocation happens on the first launch for a key (every `pack` also asks for the
current stream's, ahead of the first launch); later launches find it in a dict, so the
steady state adds no launch and no allocation, only a capture-status query. A new
workspace is allocated and zeroed on a private, non-capturing stream and that stream is
synchronised before use, so under capture no memset is recorded into the graph (a graph
would re-zero on every replay) and nothing waits on the capturing stream; during capture
the allocation runs in CUDA's relaxed capture mode (`capture_tolerant`), as torch's own
allocator does. Workspaces are
never freed: a captured graph may still point at one after it was outgrown, and there is
one per stream or graph, a few MB each.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ReductionWorkspace:
    """Arrival counters (zero between launches) and fp32 partial-sum slots."""

    counters: Any
    partials: Any


@contextmanager
def capture_tolerant():
    """Let this thread allocate while a capture is under way (CUDA's relaxed capture mode):
    cudaMalloc is a "potentially unsafe" call during capture because the graph does not
    record it, which is just what a workspace that outlives the graph wants. torch's caching
    allocator does the same around its own allocations during capture."""
    from cuda.bindings import driver

    err, previous = driver.cuThreadExchangeStreamCaptureMode(driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED)
    if err != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuThreadExchangeStreamCaptureMode failed: {err}")
    try:
        yield
    finally:
        driver.cuThreadExchangeStreamCaptureMode(previous)


def capture_id(stream_ptr: int) -> int:
    """The id of the capture sequence `stream_ptr` is recording into, 0 when it is not capturing."""
    from cuda.bindings import driver  # comes with numba-cuda

    result = driver.cuStreamGetCaptureInfo(stream_ptr)
    err, status, ident = result[0], result[1], result[2]
    if err != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuStreamGetCaptureInfo failed on stream {stream_ptr:#x}: {err}")
    return int(ident) if status == driver.CUstreamCaptureStatus.CU_STREAM_CAPTURE_STATUS_ACTIVE else 0


class WorkspaceCache:
    """ReductionWorkspaces keyed by (device, stream, capture id), grown on demand, never shared."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[int, int, int], ReductionWorkspace] = {}
        self._outgrown: list[ReductionWorkspace] = []  # kept alive: captured graphs may point at them
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, device: int, counters: int, partials: int) -> ReductionWorkspace:
        """The workspace for a launch on CuPy's current stream of `device`, with at least
        `counters` int32 counters and `partials` fp32 slots."""
        import cupy

        stream = cupy.cuda.get_current_stream(device).ptr
        key = (device, stream, capture_id(stream))
        ws = self._by_key.get(key)
        if ws is None or ws.counters.size < counters or ws.partials.size < partials:
            ws = self._grow(key, counters, partials)
        return ws

    def _grow(self, key: tuple[int, int, int], counters: int, partials: int) -> ReductionWorkspace:
        import cupy

        device = key[0]
        with self._lock:
            old = self._by_key.get(key)
            if old is not None:
                counters, partials = max(counters, old.counters.size), max(partials, old.partials.size)
                self._outgrown.append(old)
            with cupy.cuda.Device(device), capture_tolerant() if key[2] else nullcontext():
                side = cupy.cuda.Stream(non_blocking=True)
                with side:
                    ws = ReductionWorkspace(cupy.zeros(counters, dtype=cupy.int32), cupy.empty(partials, dtype=cupy.float32))
                side.synchronize()
            self._by_key[key] = ws
            return ws
