"""MarlinLinear and the marlin_ladder::int4_matmul custom op against the reference.

On a CPU machine the layer runs rung s0_numpy; the same tests hold it to the reference
error bound, check that GPTQ and AWQ checkpoints give exactly the layer the quantize path
gives, that act-order, bias and leading dimensions are right, that torch.compile traces
the op without graph breaks (through its fake implementation) and that bad inputs get
clear one-sentence errors. Tests marked `gpu` repeat the essentials on CUDA with the
fastest rung there, and add CUDA-graph capture and replay.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import reference as ref  # noqa: E402
import steps  # noqa: E402
from reference.formats import (  # noqa: E402
    act_order_permutation,
    dequantize_checkpoint_order,
    export_awq,
    export_gptq,
    group_index,
)
from reference.quant import expand_groups  # noqa: E402
from reference.sparse_marlin import prune_quantized_2_4  # noqa: E402
from steps._arrays import to_host  # noqa: E402
from steps.torch.layer import MarlinLinear, int4_matmul, launch_rung, replace_linear_layers, select_step  # noqa: E402

seeds = st.integers(0, 2**32 - 1)


def torch_gptq(qw, perm=None, checkpoint_format="gptq"):
    t = export_gptq(qw, perm, checkpoint_format=checkpoint_format)
    return {name: torch.from_numpy(getattr(t, name)) for name in ("qweight", "qzeros", "scales", "g_idx")}


def random_linear(rng, K, N, bias=True):
    linear = torch.nn.Linear(K, N, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(rng.standard_normal((N, K), dtype=np.float32) / np.sqrt(K)))
        if bias:
            linear.bias.copy_(torch.from_numpy(rng.standard_normal(N, dtype=np.float32)))
    return linear


def canonical_act_order(rng, K, group_size):
    """A random GPTQ act-order permutation (None when K is a single group)."""
    return act_order_permutation(group_index(K, group_size, rng.permutation(K)), K, group_size)


def activations(rng, M, K, device="cpu"):
    return torch.from_numpy(rng.standard_normal((M, K), dtype=np.float32).astype(np.float16)).to(device)


def excess(y, x, qw, step_name, perm=None):
    """How far y = x @ W is from the reference bound for its rung (<= 1 passes)."""
    A = to_host(x)
    if perm is not None:
        A = A[:, perm]
    return ref.error_excess(to_host(y), A, qw, steps.get(step_name).error_c)


# -- correctness on the CPU rung ---------------------------------------------------------------------


@given(
    st.sampled_from(ref.GROUP_SIZES),
    st.integers(1, 3).map(lambda k: 128 * k),
    st.integers(1, 6).map(lambda n: 8 * n),
    st.integers(0, 9),
    st.booleans(),
    seeds,
)
def test_from_linear_matches_the_reference_within_the_rungs_bound(g, K, N, M, zero_point, seed):
    rng = np.random.default_rng(seed)
    linear = random_linear(rng, K, N, bias=False)
    layer = MarlinLinear.from_linear(linear, group_size=g, zero_point=zero_point)
    qw = ref.quantize(linear.weight.detach().numpy().T, g, symmetric=not zero_point)
    x = activations(rng, M, K)
    y = layer(x)
    assert y.shape == (M, N) and y.dtype == torch.float16
    assert excess(y, x, qw, layer.step) <= 1.0


@given(st.sampled_from(ref.GROUP_SIZES), st.integers(0, 9), st.booleans(), seeds)
def test_bf16_linear_gives_a_bf16_layer_within_the_bound(g, M, zero_point, seed):
    rng = np.random.default_rng(seed)
    linear = random_linear(rng, 256, 24, bias=False).to(torch.bfloat16)
    layer = MarlinLinear.from_linear(linear, group_size=g, zero_point=zero_point)
    W = linear.weight.detach().float().numpy().T
    qw = ref.quantize(W, g, symmetric=not zero_point, dtype="bfloat16")
    x = activations(rng, M, 256).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and "dtype=bfloat16" in repr(layer)
    assert excess(y, x, qw, layer.step) <= 1.0


def test_checkpoint_import_in_bf16_rounds_the_scales_once():
    rng = np.random.default_rng(21)
    qw = ref.random_quantized_weight(rng, 256, 64, 128, symmetric=False)
    t = export_awq(qw)
    layer = MarlinLinear.from_awq(
        torch.from_numpy(t.qweight), torch.from_numpy(t.qzeros), torch.from_numpy(t.scales), group_size=128,
        dtype=torch.bfloat16,
    )  # fmt: skip
    bf16 = ref.QuantizedWeight(qw.codes, qw.scales.astype(ref.element_dtype("bfloat16")), 128, qw.zeros)
    assert layer.step == "s0_numpy"  # the plain layout: the scales are stored as they are
    assert np.array_equal(layer.packed_scales.numpy().view(ref.element_dtype("bfloat16")), bf16.scales)
    x = activations(rng, 5, 256).to(torch.bfloat16)
    assert excess(layer(x), x, bf16, layer.step) <= 1.0
    with pytest.raises(TypeError, match="dtype must be torch.float16 or torch.bfloat16, got torch.float32"):
        MarlinLinear.from_awq(torch.from_numpy(t.qweight), torch.from_numpy(t.qzeros), torch.from_numpy(t.scales),
                              group_size=128, dtype=torch.float32)  # fmt: skip


@given(st.sampled_from(ref.GROUP_SIZES), st.integers(0, 9), st.booleans(), seeds)
def test_sparse_layer_computes_the_pruned_product(g, M, zero_point, seed):
    rng = np.random.default_rng(seed)
    linear = random_linear(rng, 256, 24, bias=False)
    layer = MarlinLinear.from_linear(linear, group_size=g, zero_point=zero_point, sparse=True)
    qw = prune_quantized_2_4(ref.quantize(linear.weight.detach().numpy().T, g, symmetric=not zero_point))
    zero = expand_groups(qw.zeros_or_default(), qw)
    assert ((qw.codes != zero).reshape(-1, 4, qw.N).sum(axis=1) <= 2).all()  # the spec really is 2:4
    x = activations(rng, M, 256)
    assert layer.sparse and "sparse=True" in repr(layer)
    assert excess(layer(x), x, qw, layer.step) <= 1.0


def test_sparse_needs_a_2_4_weight_and_the_sparse_rung_needs_sparse():
    qw = ref.random_quantized_weight(np.random.default_rng(9), 256, 16)
    with pytest.raises(ValueError, match="at most 2 non-zero codes in every 4 consecutive rows"):
        MarlinLinear(qw, sparse=True)
    with pytest.raises(ValueError, match="build the layer with sparse=True"):
        MarlinLinear(qw, step="s7_sparse_marlin")
    assert MarlinLinear(prune_quantized_2_4(qw), sparse=True).step == "s0_numpy"


def test_cpu_picks_the_cpu_rung():
    qw = ref.random_quantized_weight(np.random.default_rng(0), 256, 64)
    assert select_step(qw, torch.device("cpu")).name == "s0_numpy"
    assert MarlinLinear(qw).step == "s0_numpy"


@given(st.sampled_from(ref.GROUP_SIZES), st.booleans(), st.sampled_from(["gptq", "gptq_v2"]), st.booleans(), seeds)
def test_gptq_checkpoint_gives_the_quantize_path_layer(g, zero_point, fmt, act_order, seed):
    rng = np.random.default_rng(seed)
    K, N = 256, 32
    qw = ref.quantize(rng.standard_normal((K, N)), g, symmetric=not zero_point)
    if fmt == "gptq" and qw.zeros is not None:
        qw = ref.QuantizedWeight(qw.codes, qw.scales, g, np.maximum(qw.zeros, 1))  # v1 cannot store zero 0
    perm = canonical_act_order(rng, K, g) if act_order else None
    from_checkpoint = MarlinLinear.from_gptq(**torch_gptq(qw, perm, fmt), group_size=g, checkpoint_format=fmt)
    direct = MarlinLinear(qw, perm)
    for name, buffer in direct.state_dict().items():
        if isinstance(buffer, torch.Tensor):
            assert torch.equal(from_checkpoint.state_dict()[name], buffer), name
    x = activations(rng, 5, K)
    assert torch.equal(from_checkpoint(x), direct(x))


@given(st.sampled_from(ref.GROUP_SIZES), st.booleans(), seeds)
def test_awq_checkpoint_gives_the_quantize_path_layer(g, zero_point, seed):
    rng = np.random.default_rng(seed)
    qw = ref.quantize(rng.standard_normal((256, 32)), g, symmetric=not zero_point)
    t = export_awq(qw)
    layer = MarlinLinear.from_awq(torch.from_numpy(t.qweight), torch.from_numpy(t.qzeros), torch.from_numpy(t.scales), group_size=g)
    x = activations(rng, 4, 256)
    assert torch.equal(layer(x), MarlinLinear(qw)(x))


@given(st.sampled_from([32, 64, 128]), st.integers(1, 6), seeds)
def test_act_order_layer_computes_the_checkpoint_order_product(g, M, seed):
    rng = np.random.default_rng(seed)
    K, N = 256, 24
    qw = ref.random_quantized_weight(rng, K, N, g)
    perm = canonical_act_order(rng, K, g)
    layer = MarlinLinear.from_gptq(**torch_gptq(qw, perm), group_size=g)
    assert layer.perm is not None
    x = activations(rng, M, K)
    y = layer(x)
    assert excess(y, x, qw, layer.step, perm) <= 1.0
    # and against the dense weight in the checkpoint's own row order, with no permutation at all
    dense = dequantize_checkpoint_order(qw, perm)
    assert ref.error_excess(y.numpy(), x.numpy(), dense, steps.get(layer.step).error_c) <= 1.0


def test_bias_is_added_to_the_product():
    rng = np.random.default_rng(1)
    linear = random_linear(rng, 128, 16)
    with_bias = MarlinLinear.from_linear(linear)
    linear.bias = None
    without = MarlinLinear.from_linear(linear)
    x = activations(rng, 3, 128)
    assert torch.equal(with_bias(x), without(x) + with_bias.bias)


def test_leading_dimensions_and_empty_batches():
    rng = np.random.default_rng(2)
    layer = MarlinLinear.from_linear(random_linear(rng, 128, 16))
    x = activations(rng, 6, 128).reshape(2, 3, 128)
    y = layer(x)
    assert y.shape == (2, 3, 16)
    assert torch.equal(y.reshape(6, 16), layer(x.reshape(6, 128)))
    assert layer(torch.empty(0, 5, 128, dtype=torch.float16)).shape == (0, 5, 16)


def test_non_contiguous_input_is_accepted_by_the_layer():
    rng = np.random.default_rng(3)
    layer = MarlinLinear.from_linear(random_linear(rng, 128, 16))
    x = activations(rng, 128, 4).t()  # (4, 128), column-major
    assert not x.is_contiguous()
    assert torch.equal(layer(x), layer(x.contiguous()))


def test_model_dtype_conversions_leave_packed_weights_intact():
    rng = np.random.default_rng(4)
    model = torch.nn.Sequential(MarlinLinear.from_linear(random_linear(rng, 128, 16, bias=False)))
    x = activations(rng, 2, 128)
    before = model(x)
    model.to(torch.bfloat16)  # converts every floating buffer (a bias would be); the packed scales are stored as int16
    assert torch.equal(model(x), before)


def test_state_dict_round_trip():
    rng = np.random.default_rng(5)
    qw = ref.random_quantized_weight(rng, 256, 32, 64)
    perm = canonical_act_order(rng, 256, 64)
    source = MarlinLinear(qw, perm, torch.randn(32))
    target = MarlinLinear(ref.random_quantized_weight(rng, 256, 32, 64), perm, torch.zeros(32))
    target.load_state_dict(source.state_dict())
    x = activations(rng, 3, 256)
    assert torch.equal(target(x), source(x))
    other_groups = MarlinLinear(ref.random_quantized_weight(rng, 256, 32, 128), perm=None, bias=torch.zeros(32))
    with pytest.raises((ValueError, RuntimeError)):
        other_groups.load_state_dict(source.state_dict())


def test_replace_linear_layers_skips_the_head():
    rng = np.random.default_rng(6)
    model = torch.nn.Sequential()
    model.add_module("up", random_linear(rng, 128, 256))
    model.add_module("act", torch.nn.ReLU())
    model.add_module("down", random_linear(rng, 256, 128))
    model.add_module("lm_head", random_linear(rng, 128, 64))
    x = activations(rng, 4, 128)
    expected = model.float()(x.float())
    replaced = replace_linear_layers(model, group_size=64)
    assert replaced == ["up", "down"]
    assert isinstance(model.up, MarlinLinear) and isinstance(model.down, MarlinLinear)
    assert type(model.lm_head) is torch.nn.Linear
    model.lm_head.half()
    y = model(x)
    # 4-bit weights: close to the float model, not equal
    assert torch.nn.functional.cosine_similarity(y.float().flatten(), expected.flatten(), dim=0) > 0.98


# -- the custom op under torch.compile --------------------------------------------------------------


def test_opcheck_schema_fake_and_aot_dispatch():
    rng = np.random.default_rng(7)
    layer = MarlinLinear(ref.random_quantized_weight(rng, 256, 32, 128))
    arrays = [getattr(layer, b) for b in layer.array_buffers]
    args = (activations(rng, 3, 256), arrays, layer.arrays_spec, layer.step, 256, 32, 128)
    torch.library.opcheck(int4_matmul, args)


def test_compile_fullgraph_has_no_graph_breaks_and_matches_eager():
    rng = np.random.default_rng(8)
    qw = ref.random_quantized_weight(rng, 256, 128, 64)
    model = torch.nn.Sequential(
        MarlinLinear(qw, canonical_act_order(rng, 256, 64), torch.randn(128)),
        torch.nn.ReLU(),
        MarlinLinear.from_linear(random_linear(rng, 128, 64)),
    )
    x = activations(rng, 5, 256).reshape(1, 5, 256)
    # aot_eager traces through the fake implementation and AOT autograd without C++ codegen
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), model(x))
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


# -- errors ---------------------------------------------------------------------------------------


@pytest.fixture
def layer():
    return MarlinLinear.from_linear(random_linear(np.random.default_rng(9), 128, 16))


def one_sentence(message: str) -> bool:
    return "\n" not in message and message.count(". ") == 0


def test_activations_of_another_dtype_than_the_layers_are_refused(layer):
    with pytest.raises(TypeError, match="holds float16 scales and takes float16 activations, got bfloat16; cast") as e:
        layer(torch.zeros(2, 128, dtype=torch.bfloat16))
    assert one_sentence(str(e.value))
    with pytest.raises(TypeError, match="takes float16 or bfloat16 activations, got float32; cast the input") as e:
        layer(torch.zeros(2, 128, dtype=torch.float32))
    assert one_sentence(str(e.value))


def test_wrong_k_is_refused(layer):
    with pytest.raises(ValueError, match=r"last dimension is K=128, got shape \(2, 64\)") as e:
        layer(torch.zeros(2, 64, dtype=torch.float16))
    assert one_sentence(str(e.value))


@pytest.mark.parametrize(
    "group_size, K, message",
    [(256, 512, "group_size 256 is not supported; use one of"), (128, 192, "K=192 is not divisible by group_size 128")],
)
def test_unsupported_group_sizes_are_refused(group_size, K, message):
    with pytest.raises(ValueError, match=message) as e:
        MarlinLinear.from_linear(torch.nn.Linear(K, 16), group_size=group_size)
    assert one_sentence(str(e.value))


def test_op_refuses_non_contiguous_and_non_matrix_inputs(layer):
    arrays = [getattr(layer, b) for b in layer.array_buffers]
    rest = (arrays, layer.arrays_spec, layer.step, 128, 16, 128)
    with pytest.raises(ValueError, match=r"needs a C-contiguous \(row-major\) x"):
        int4_matmul(torch.zeros(128, 4, dtype=torch.float16).t(), *rest)
    with pytest.raises(ValueError, match="takes a 2-D"):
        int4_matmul(torch.zeros(1, 2, 128, dtype=torch.float16), *rest)


def test_rung_that_cannot_run_here_is_named_with_the_reason():
    qw = ref.random_quantized_weight(np.random.default_rng(10), 128, 16)
    with pytest.raises(ValueError, match="s1_numba_naive: it runs on CUDA"):
        MarlinLinear(qw, step="s1_numba_naive")
    with pytest.raises(KeyError, match="no rung named 's9_imaginary'"):
        MarlinLinear(qw, step="s9_imaginary")


def test_launch_rung_hands_rows_over_only_where_the_other_rung_reads_the_same_arrays(monkeypatch):
    """Rung 8 hands launches of 9-16 rows of the smaller weights to rung 6 (Step.hands_rows_to),
    but only for weights that both pack to the same padded shape and whose dtype and zero points
    rung 6 takes."""
    s6, s8 = steps.get("s6_marlin"), steps.get("s8_hopper")
    monkeypatch.setattr(type(s6), "available", lambda self: steps.step.SUPPORTED)
    monkeypatch.setattr(type(s6), "check_first_run", lambda self, *args: None)
    handover = s8.hands_rows_to
    first, last = handover.first_row, handover.last_row
    gpu = torch.device("cuda", 0)
    for M in (first - 1, first, last, last + 1):
        expected = s6 if first <= M <= last else s8
        assert launch_rung(s8, M, 4096, 11008, 128, "float16", False, gpu) is expected
        assert launch_rung(s8, M, 4096, 11008, 128, "bfloat16", True, gpu) is expected
    # The size bound: K x N / 2 bytes just under it are handed over, at it are not.
    K = 4096
    N_under = (2 * handover.below_bytes // K - 1) // 256 * 256
    assert launch_rung(s8, first, K, N_under, 128, "float16", False, gpu) is s6
    assert launch_rung(s8, first, K, 2 * handover.below_bytes // K, 128, "float16", False, gpu) is s8
    assert s6.padded_shape(1024, 384, 128) != s8.padded_shape(1024, 384, 128)
    assert launch_rung(s8, 16, 1024, 384, 128, "float16", False, gpu) is s8  # 384 columns: s8 pads to 512, s6 does not
    assert launch_rung(s6, 16, 4096, 4096, 128, "float16", False, gpu) is s6  # rung 6 hands nothing over

    def refused(self, *args):
        raise steps._first_run.VariantRefused("refused here")

    monkeypatch.setattr(type(s6), "check_first_run", refused)
    assert launch_rung(s8, 16, 4096, 4096, 128, "float16", False, gpu) is s8


def test_bad_checkpoint_tensors_are_refused():
    qw = ref.random_quantized_weight(np.random.default_rng(11), 128, 16)
    t = torch_gptq(qw)
    with pytest.raises(TypeError, match="scales is bfloat16"):
        MarlinLinear.from_gptq(**{**t, "scales": t["scales"].bfloat16()})
    with pytest.raises(ValueError, match="qweight has 16 rows, expected K/8 = 8 for K = 64"):
        MarlinLinear.from_gptq(**{**t, "g_idx": t["g_idx"][:64]})
    with pytest.raises(ValueError, match="qweight has 10 rows, expected K/8 = 16 for K = 128"):
        MarlinLinear.from_gptq(**{**t, "qweight": t["qweight"][:10]}, shape=(128, 16))


# -- on a GPU ---------------------------------------------------------------------------------------


def cuda_layer(rng, K=1024, N=512, g=128, act_order=True):
    qw = ref.random_quantized_weight(rng, K, N, g)
    perm = canonical_act_order(rng, K, g) if act_order else None
    layer = MarlinLinear.from_gptq(**torch_gptq(qw, perm), bias=torch.randn(N), group_size=g, device="cuda")
    return layer, qw, perm


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 100])
def test_cuda_layer_matches_the_reference(M):
    rng = np.random.default_rng(12)
    layer, qw, perm = cuda_layer(rng)
    assert layer.step != "s0_numpy" and all(getattr(layer, b).is_cuda for b in layer.array_buffers)
    layer.bias = None
    x = activations(rng, M, qw.K, "cuda")
    y = layer(x)
    assert y.is_cuda and excess(y, x, qw, layer.step, perm) <= 1.0


def top_dense_rung() -> str:
    """The rung MarlinLinear picks on this GPU for a plain symmetric fp16 weight (s8 on Hopper, else s6)."""
    return select_step(ref.random_quantized_weight(np.random.default_rng(0), 1024, 512, 128), torch.device("cuda")).name


@pytest.mark.gpu
@pytest.mark.parametrize("zero_point", [False, True])
@pytest.mark.parametrize("M", [1, 16, 100])
def test_cuda_bf16_layer_matches_the_reference(M, zero_point):
    rng = np.random.default_rng(13)
    linear = random_linear(rng, 1024, 512, bias=False).to(torch.bfloat16)
    layer = MarlinLinear.from_linear(linear, zero_point=zero_point, device="cuda")
    assert layer.step == top_dense_rung()
    qw = ref.quantize(linear.weight.detach().float().numpy().T, 128, symmetric=not zero_point, dtype="bfloat16")
    x = activations(rng, M, qw.K, "cuda").to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and excess(y, x, qw, layer.step) <= 1.0


@pytest.mark.gpu
@pytest.mark.parametrize("g", [-1, 128])
def test_cuda_awq_layer_with_zero_points_runs_on_the_top_dense_rung(g):
    rng = np.random.default_rng(16)
    qw = ref.random_quantized_weight(rng, 1024, 512, g, symmetric=False)
    t = export_awq(qw)
    layer = MarlinLinear.from_awq(
        torch.from_numpy(t.qweight), torch.from_numpy(t.qzeros), torch.from_numpy(t.scales), group_size=g, device="cuda"
    )
    assert layer.step == top_dense_rung()
    x = activations(rng, 16, qw.K, "cuda")
    assert excess(layer(x), x, qw, layer.step) <= 1.0


@pytest.mark.gpu
@pytest.mark.parametrize("zero_point", [False, True])
def test_cuda_layer_runs_each_launch_on_the_rung_that_takes_its_rows(zero_point):
    """On Hopper the layer is packed for rung 8; launches of 9-16 rows run rung 6's kernel on
    those arrays, bit for bit rung 6's own product, and the others rung 8's."""
    top = steps.get(top_dense_rung())
    if top.hands_rows_to is None:
        pytest.skip(f"{top.name} runs every launch itself")
    rng = np.random.default_rng(17)
    qw = ref.random_quantized_weight(rng, 1024, 512, 128, symmetric=not zero_point)
    layer = MarlinLinear(qw, device="cuda")
    other, first, last = top.hands_rows_to.to, top.hands_rows_to.first_row, top.hands_rows_to.last_row
    for M, name in ((first - 1, top.name), (first, other), (last, other), (last + 1, top.name)):
        x = activations(rng, M, qw.K, "cuda")
        rung = steps.get(name)
        alone = torch.as_tensor(rung(x, rung.pack(qw)), device="cuda")
        assert torch.equal(layer(x), alone), (M, name)


@pytest.mark.gpu
def test_cuda_sparse_layer_runs_on_the_sparse_rung():
    rng = np.random.default_rng(13)
    linear = random_linear(rng, 1024, 512).cuda()
    layer = MarlinLinear.from_linear(linear, sparse=True)
    assert layer.step == "s7_sparse_marlin"
    layer.bias = None
    qw = prune_quantized_2_4(ref.quantize(linear.weight.detach().cpu().numpy().T, 128))
    x = activations(rng, 16, 1024, "cuda")
    assert excess(layer(x), x, qw, layer.step) <= 1.0


@pytest.mark.gpu
def test_cuda_compile_fullgraph_matches_eager():
    rng = np.random.default_rng(13)
    layer, qw, _ = cuda_layer(rng)
    model = torch.nn.Sequential(layer, torch.nn.ReLU())
    x = activations(rng, 8, qw.K, "cuda")
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-3, atol=1e-3)
    assert torch._dynamo.explain(model)(x).graph_break_count == 0


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay_give_the_eager_output():
    rng = np.random.default_rng(14)
    layer, qw, _ = cuda_layer(rng)
    static_x = activations(rng, 4, qw.K, "cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compilation, module load) outside the capture
        layer(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = layer(static_x)
    for seed in range(3):
        x = activations(np.random.default_rng(100 + seed), 4, qw.K, "cuda")
        static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_y, layer(x))


@pytest.mark.gpu
def test_moving_a_packed_layer_across_device_types_is_refused():
    layer = MarlinLinear.from_linear(random_linear(np.random.default_rng(15), 128, 16)).to("cuda")
    with pytest.raises(ValueError, match="packed for rung s0_numpy on cpu but its buffers were moved to cuda"):
        layer(torch.zeros(2, 128, dtype=torch.float16, device="cuda"))


def test_a_cpu_layer_says_once_that_it_is_the_slow_reference_path():
    from steps.torch import layer as layer_module

    layer_module._warn_reference_path.cache_clear()
    qw = ref.random_quantized_weight(np.random.default_rng(12), 128, 16)
    with pytest.warns(UserWarning, match="the reference path: it dequantizes the whole weight"):
        MarlinLinear(qw)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MarlinLinear(qw)  # said once only


def test_a_rung_not_chosen_by_default_is_taken_only_by_name(monkeypatch):
    """MarlinLinear's automatic choice skips rungs marked chosen_by_default = False (a rung
    measured slower than the one below it) but still builds them when named."""
    qw = ref.random_quantized_weight(np.random.default_rng(0), 256, 128, 128)
    top = steps.get("s0_numpy")
    monkeypatch.setattr(type(top), "chosen_by_default", False)
    with pytest.raises(ValueError, match="no rung runs"):
        select_step(qw, torch.device("cpu"))
    assert select_step(qw, torch.device("cpu"), "s0_numpy") is top
