"""Launches of every CUDA rung on several streams at once, and in several captured graphs
replayed at once, give bit for bit the serial results.

Overlap is forced, not hoped for: a long sleep kernel holds stream 0, an event recorded
after it gates every other stream, and each gated stream then queues its products, so when
the sleep ends they all become ready together. Events around each stream's work show
that the intervals overlapped (the latest start precedes the earliest end). The rungs'
kernels are deterministic (partial sums are added in a fixed order), so any sharing of
scratch memory between concurrent launches shows up as a bitwise difference.
"""

from __future__ import annotations

import numpy as np
import pytest

import reference as ref
import steps

CUDA_STEPS = [pytest.param(s, id=s.name) for s in steps.STEPS if s.device == "cuda" and s.name != "s1_numba_naive"]
SHAPES = [(1, 4096, 4096, 128), (16, 2048, 8192, 128), (64, 4096, 2048, -1), (200, 1024, 4096, 64)]
STREAMS = 4
REPEATS = 20  # products per stream: long enough intervals that overlap is unambiguous
SLEEP_CYCLES = 200_000_000  # ~0.1 s on a ~2 GHz GPU


def _problems(step, rng, M, K, N, g):
    import torch

    problems = []
    for _ in range(STREAMS):
        qw = ref.random_quantized_weight(rng, K, N, g)
        A = torch.from_numpy(rng.standard_normal((M, K), dtype=np.float32).astype(np.float16)).cuda()
        problems.append((A, step.pack(qw)))
    return problems


def _overlapped(starts, ends, what: str) -> bool:
    """Whether all intervals share a moment: the latest start precedes the earliest end.
    Prints the shared window (shown with `pytest -rP`), the evidence that they overlapped."""
    origin = starts[0]
    latest_start = max(origin.elapsed_time(s) for s in starts)
    earliest_end = min(origin.elapsed_time(e) for e in ends)
    print(f"{what}: {len(starts)} streams, latest start {latest_start:.3f} ms, earliest end {earliest_end:.3f} ms")
    return latest_start < earliest_end


@pytest.mark.gpu
@pytest.mark.parametrize("step", CUDA_STEPS)
@pytest.mark.parametrize("M, K, N, g", SHAPES)
def test_concurrent_streams_give_the_serial_results(step, M, K, N, g):
    import torch

    if not step.supports(M, K, N, g):
        pytest.skip(step.supports(M, K, N, g).reason)
    rng = np.random.default_rng(M + K + N)
    problems = _problems(step, rng, M, K, N, g)
    serial = [step(A, packed) for A, packed in problems]
    torch.cuda.synchronize()

    holder, streams = torch.cuda.Stream(), [torch.cuda.Stream() for _ in problems]
    gate = torch.cuda.Event()
    starts = [torch.cuda.Event(enable_timing=True) for _ in problems]
    ends = [torch.cuda.Event(enable_timing=True) for _ in problems]
    outs = [torch.full_like(c, float("nan")) for c in serial]
    with torch.cuda.stream(holder):
        torch.cuda._sleep(SLEEP_CYCLES)
        gate.record()
    for (A, packed), stream, start, end, out in zip(problems, streams, starts, ends, outs):
        with torch.cuda.stream(stream):
            stream.wait_event(gate)
            start.record()
            for _ in range(REPEATS):
                step(A, packed, out=out)
            end.record()
    torch.cuda.synchronize()
    assert _overlapped(starts, ends, f"{step.name} M={M} K={K} N={N} g={g}"), "the streams' launches did not overlap; the test proved nothing"
    for got, want in zip(outs, serial):
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.gpu
@pytest.mark.parametrize("step", CUDA_STEPS)
def test_graphs_replayed_concurrently_give_the_serial_results(step):
    """Graphs captured one after another (on torch's one capture stream) and replayed at once
    on different streams: each capture has its own scratch memory."""
    import torch

    M, K, N, g = 16, 2048, 8192, 128
    rng = np.random.default_rng(7)
    problems = _problems(step, rng, M, K, N, g)
    serial = [step(A, packed) for A, packed in problems]
    outs = [torch.full_like(c, float("nan")) for c in serial]
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # warm-up off the default stream, as torch's graph docs ask
        for (A, packed), out in zip(problems, outs):
            step(A, packed, out=out)
    torch.cuda.synchronize()
    workspaces_before = len(getattr(step, "_workspaces", ()))
    graphs = []
    for (A, packed), out in zip(problems, outs):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(REPEATS):
                step(A, packed, out=out)
        graphs.append(graph)
    if hasattr(step, "_workspaces"):  # rungs with a reduction workspace: one more per capture
        assert len(step._workspaces) == workspaces_before + len(graphs)
    for out in outs:
        out.fill_(float("nan"))
    torch.cuda.synchronize()

    holder, streams = torch.cuda.Stream(), [torch.cuda.Stream() for _ in graphs]
    gate = torch.cuda.Event()
    starts = [torch.cuda.Event(enable_timing=True) for _ in graphs]
    ends = [torch.cuda.Event(enable_timing=True) for _ in graphs]
    with torch.cuda.stream(holder):
        torch.cuda._sleep(SLEEP_CYCLES)
        gate.record()
    for graph, stream, start, end in zip(graphs, streams, starts, ends):
        with torch.cuda.stream(stream):
            stream.wait_event(gate)
            start.record()
            graph.replay()
            end.record()
    torch.cuda.synchronize()
    assert _overlapped(starts, ends, f"{step.name} graphs"), "the graph replays did not overlap; the test proved nothing"
    for got, want in zip(outs, serial):
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.gpu
@pytest.mark.parametrize("step", CUDA_STEPS)
def test_layers_chained_in_a_graph_give_the_eager_results(step):
    """Layers captured back to back in one graph, each one's input the previous one's output, as
    a decode step runs them. Rung 8 launches each kernel as a programmatic dependent launch, which
    starts before the previous kernel has finished: one that read its activations (or wrote its
    output) before waiting for that kernel would read the poison the outputs are filled with."""
    import torch

    M, K, layers = 16, 4096, 4
    if not step.supports(M, K, K, 128):
        pytest.skip(step.supports(M, K, K, 128).reason)
    rng = np.random.default_rng(11)
    scale = np.full((K // 128, K), 1 / 256, np.float16)  # outputs stay of the inputs' size, layer after layer
    packed = [step.pack(ref.QuantizedWeight(rng.integers(0, 16, (K, K), dtype=np.uint8), scale, 128)) for _ in range(layers)]
    x = torch.from_numpy(rng.standard_normal((M, K), dtype=np.float32).astype(np.float16)).cuda()
    eager = [x]
    for p in packed:
        eager.append(step(eager[-1], p))
    buffers = [x] + [torch.empty_like(x) for _ in packed]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as torch's graph docs ask
        for i, p in enumerate(packed):
            step(buffers[i], p, out=buffers[i + 1])
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i, p in enumerate(packed):
            step(buffers[i], p, out=buffers[i + 1])
    for _ in range(5):
        for b in buffers[1:]:
            b.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for i, (got, want) in enumerate(zip(buffers[1:], eager[1:])):
            assert torch.equal(got.view(torch.int16), want.view(torch.int16)), f"layer {i} differs from its eager run"


# -- on the CPU: the workspace cache's keys, with a stand-in for CuPy ---------------------------------


class _FakeCupy:
    """Just what steps._workspace uses of CuPy: the current stream, devices, streams, arrays."""

    def __init__(self):
        import contextlib
        import types

        self.stream_ptr = 1
        fake = self

        class Stream:
            def __init__(self, non_blocking=False):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def synchronize(self):
                pass

        self.cuda = types.SimpleNamespace(
            get_current_stream=lambda device=-1: types.SimpleNamespace(ptr=fake.stream_ptr),
            Device=lambda device: contextlib.nullcontext(),
            Stream=Stream,
        )
        self.int32, self.float32 = np.int32, np.float32

    def zeros(self, n, dtype):
        return np.zeros(n, dtype)

    def empty(self, n, dtype):
        return np.empty(n, dtype)


def test_workspaces_are_one_per_stream_and_per_capture_and_never_freed(monkeypatch):
    import sys

    from steps import _workspace

    cupy = _FakeCupy()
    capturing = {}  # stream -> capture id
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setattr(_workspace, "capture_id", lambda ptr: capturing.get(ptr, 0))
    monkeypatch.setattr(_workspace, "capture_tolerant", lambda: __import__("contextlib").nullcontext())
    cache = _workspace.WorkspaceCache()

    first = cache.get(0, 4096, 1000)
    assert cache.get(0, 4096, 1000) is first and cache.get(0, 100, 10) is first  # same stream: reused
    cupy.stream_ptr = 2
    second = cache.get(0, 4096, 1000)
    assert second is not first and not np.shares_memory(second.counters, first.counters)
    assert cache.get(1, 4096, 1000) is not second  # another device
    capturing[2] = 7  # two graphs captured one after another on the same stream
    graph_a = cache.get(0, 4096, 1000)
    capturing[2] = 8
    graph_b = cache.get(0, 4096, 1000)
    assert len({id(w) for w in (first, second, graph_a, graph_b)}) == 4
    capturing[2] = 0
    assert cache.get(0, 4096, 1000) is second  # eager again: the stream's own
    grown = cache.get(0, 8192, 1000)
    assert grown.counters.size == 8192 and grown.partials.size == 1000 and not grown.counters.any()
    assert second in cache._outgrown  # a graph may still point at it
