"""The Triton decode attention of the e2e benchmark (steps/torch/decode_attention.py).

Against float64 attention within its documented bound, on random shapes, masks and both
dtypes, into poisoned outputs, with and without splitting the cache; the e2e model's
decode attention takes it on a GPU; torch.compile(fullgraph=True) and CUDA-graph replay
give the eager result. Needs triton (GPU installs of torch); the kernel runs on the GPU.
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from steps.torch import decode_attention as da  # noqa: E402
from steps._cuda import sm_count  # noqa: E402
from steps.torch.decode_attention import exact_attention  # noqa: E402


def random_operands(B, Hkv, G, L, D, dtype, mask_kind, seed, device="cuda"):
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(shape, dtype=dtype, device=device, generator=gen)
               for shape in ((B, Hkv, G, D), (B, Hkv, L, D), (B, Hkv, L, D)))  # fmt: skip
    lengths = torch.randint(1, L + 1, (B,), device=device, generator=gen)
    mask = {
        "none": None,
        "prefix": (torch.arange(L, device=device) < lengths[:, None]).view(B, 1, 1, L),  # sequence b sees a prefix
        "shared": torch.rand((1, 1, 1, L), device=device, generator=gen) < 0.5,  # one mask for the batch
    }[mask_kind]
    if mask is not None:
        mask[..., 0] = True  # at least one position counts: else attention is undefined (NaN)
    return q, k, v, mask


def test_splits_cover_the_cache_in_whole_blocks_and_fill_the_sms():
    for pairs in (1, 7, 64, 512, 4096):
        for L in (1, 63, 64, 65, 1000, 4096):
            splits, chunk = da.cache_splits(pairs, L, 132)
            assert chunk % da.BLOCK_L == 0 and (splits - 1) * chunk < L <= splits * chunk
            blocks = -(-L // da.BLOCK_L)
            assert splits <= blocks and 2 * pairs * splits >= min(2 * 132, pairs * blocks)


def test_operands_the_kernel_does_not_take_are_refused():
    q, k, v, mask = random_operands(2, 2, 4, 16, 32, torch.float16, "prefix", 0, device="cpu")
    assert da.supports(q, k, v, mask) and da.supports(q, k, v, None)
    assert not da.supports(q, k, v, torch.zeros((2, 1, 1, 16)))  # a float (additive) mask
    assert not da.supports(q, k, v, torch.ones((2, 8, 1, 16), dtype=torch.bool))  # a mask per query head
    assert not da.supports(q, k.float(), v, mask)
    assert not da.supports(q.float(), k.float(), v.float(), mask)
    assert not da.supports(*(t[..., :24] for t in (q, k, v)), mask)  # D not a power of two


@pytest.mark.gpu
@given(
    B=st.integers(1, 6), Hkv=st.integers(1, 4), G=st.sampled_from([1, 2, 3, 8, 16]), L=st.integers(1, 700),
    D=st.sampled_from([16, 64, 128]), dtype=st.sampled_from(["float16", "bfloat16"]),
    mask_kind=st.sampled_from(["none", "prefix", "shared"]), seed=st.integers(0, 2**31 - 1),
)  # fmt: skip
def test_decode_attention_is_exact_attention_within_its_bound(B, Hkv, G, L, D, dtype, mask_kind, seed):
    q, k, v, mask = random_operands(B, Hkv, G, L, D, getattr(torch, dtype), mask_kind, seed)
    out = torch.full_like(q, float("nan"))
    da.launch(q, k, v, mask, D**-0.5, out)
    error = (out.double() - exact_attention(q, k, v, mask, D**-0.5)).abs().max().item()
    assert error <= da.error_bound(v), (error, da.error_bound(v), da.cache_splits(B * Hkv, L, sm_count(q.device.index)))


@pytest.mark.gpu
def test_a_split_cache_gives_the_unsplit_result_within_the_bound():
    """One sequence and one k/v head over 4096 positions: the cache is cut in many splits."""
    q, k, v, mask = random_operands(1, 1, 4, 4096, 128, torch.float16, "prefix", 1)
    assert da.cache_splits(1, 4096, sm_count(q.device.index))[0] > 1
    error = (da.decode_attention(q, k, v, mask, 0.1).double() - exact_attention(q, k, v, mask, 0.1)).abs().max()
    assert error <= da.error_bound(v)


@pytest.mark.gpu
def test_the_e2e_decode_attention_takes_the_kernel_on_a_gpu(monkeypatch):
    fusion = pytest.importorskip("steps.torch.e2e.fusion")
    q, k, v, mask = random_operands(3, 2, 4, 50, 128, torch.float16, "prefix", 2)
    calls, kernel = [], da.decode_attention
    monkeypatch.setattr(fusion.triton_decode, "decode_attention", lambda *a: calls.append(1) or kernel(*a))
    out = fusion.grouped_decode_attention(q.reshape(3, 8, 1, 128), k, v, mask)
    expected = exact_attention(q, k, v, mask, 128**-0.5).reshape(3, 1, 8 * 128)
    assert calls and (out.double() - expected).abs().max() <= da.error_bound(v)


@pytest.mark.gpu
@pytest.mark.parametrize("L", [64, 2048])  # one split, several
def test_compiled_and_graph_replayed_calls_compute_attention(L):
    """Compiled, the split results are combined by inductor's fused kernel (other roundings
    than eager torch ops, so within the bound, not bit for bit); a captured graph replays
    the compiled call exactly, on new inputs."""
    q, k, v, mask = random_operands(2, 2, 8, L, 128, torch.float16, "prefix", 3)
    compiled = torch.compile(lambda *a: da.decode_attention(*a, 0.125), fullgraph=True)
    assert (compiled(q, k, v, mask).double() - exact_attention(q, k, v, mask, 0.125)).abs().max() <= da.error_bound(v)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = compiled(q, k, v, mask)
    q.copy_(torch.randn_like(q))  # new inputs in the captured buffers
    graph.replay()
    assert torch.equal(out, compiled(q, k, v, mask))
