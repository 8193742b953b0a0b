"""The end-to-end decoding benchmark (steps/torch/e2e/) on a tiny Llama, on the CPU.

The model builds with every block linear layer replaced, the FP16 twin holds exactly the
weights the MarlinLinear layers multiply by, the logits check passes, greedy decoding with
the static cache gives the tokens a full recomputation gives, timing leaves the cache where
it was, and the CLI prints a table and writes JSON lines.
"""

import copy
import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch.nn.functional as F  # noqa: E402

from steps.torch import e2e  # noqa: E402
from steps.torch.e2e import fusion  # noqa: E402
from steps.torch.e2e.correctness import _fp32_one_block_at_a_time  # noqa: E402
from steps.harness.bench import describe_machine  # noqa: E402
from steps.torch.layer import MarlinLinear  # noqa: E402

LAYERS = 2
PROMPT = 5
NEW = 4


@pytest.fixture(scope="module")
def models():
    return e2e.build_models(e2e.E2EConfig(layers=LAYERS), "cpu")


def test_every_block_linear_is_replaced_and_the_twin_holds_its_dequantized_weight(models):
    assert len(models.replaced) == 7 * LAYERS  # q, k, v, o, gate, up, down per block
    assert e2e.block_linears(models.quant) == []
    assert isinstance(models.quant.lm_head, torch.nn.Linear)
    assert models.rung == "s0_numpy"
    for name in models.replaced:
        layer, linear = models.quant.get_submodule(name), models.twin.get_submodule(name)
        assert isinstance(layer, MarlinLinear) and not isinstance(linear, MarlinLinear)
        # The identity times W is W itself: on the CPU rung the product is exact.
        eye = torch.eye(layer.in_features, dtype=torch.float16)
        assert torch.equal(layer(eye), linear.weight.T)
    # The copy's stand-ins for the replaced weights are all gone; everything else was copied.
    assert not any(t.is_meta for t in [*models.quant.parameters(), *models.quant.buffers()])
    assert torch.equal(models.quant.lm_head.weight, models.twin.lm_head.weight)
    assert models.quant.lm_head.weight.data_ptr() != models.twin.lm_head.weight.data_ptr()


def test_block_weights_are_centered_so_that_deep_models_do_not_overflow(models):
    """Uniform random codes share a mean that grows block after block (70B dims overflowed
    FP16 at 32 layers); the e2e weights are drawn centered, mean zero like a real layer's."""
    for name in models.replaced:
        w = models.twin.get_submodule(name).weight.double()
        assert abs(w.mean() / w.std()) < 5 / np.sqrt(w.numel())  # uniform codes: about -0.11


def test_the_fp32_evaluation_one_block_at_a_time_equals_the_whole_model_in_fp32(models):
    """The check's FP32 logits, computed with one block's weights in FP32 at a time, are those
    of the whole model converted to FP32, and the twin is back in FP16 afterwards."""
    prompt = torch.randint(0, models.twin.config.vocab_size, (2, PROMPT), generator=torch.Generator().manual_seed(5))
    whole = copy.deepcopy(models.twin)
    e2e.set_parameter_dtype(whole, torch.float32)
    with torch.no_grad():
        expected = whole(prompt, use_cache=False).logits
        with _fp32_one_block_at_a_time(models.twin):
            logits = models.twin(prompt, use_cache=False).logits
    assert logits.dtype == torch.float32 and torch.equal(logits, expected)
    assert all(p.dtype == torch.float16 for p in models.twin.parameters())


def test_the_fp32_evaluation_holds_one_block_in_fp32_at_a_time(models):
    blocks = list(models.twin.model.layers)
    seen = []
    with _fp32_one_block_at_a_time(models.twin):
        hooks = [b.register_forward_pre_hook(
            lambda m, args: seen.append([next(b.parameters()).dtype for b in blocks]))
            for b in blocks]  # fmt: skip
        try:
            with torch.no_grad():
                models.twin(torch.zeros((1, 4), dtype=torch.long), use_cache=False)
        finally:
            for h in hooks:
                h.remove()
    assert [row.count(torch.float32) for row in seen] == [1] * len(blocks)
    assert [row.index(torch.float32) for row in seen] == list(range(len(blocks)))


def test_the_logits_check_passes(models):
    check = e2e.check_logits(models, PROMPT)
    assert check.passed, e2e.format_check(check)
    assert 0 < check.fp16_logits_rel_err < 1e-2


def test_a_layer_with_the_wrong_weights_fails_the_check(models):
    broken = copy.copy(models)
    broken.quant = copy.deepcopy(models.quant)
    first, second = "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"  # distinct pool weights
    parent, _, child = first.rpartition(".")
    setattr(broken.quant.get_submodule(parent), child, copy.deepcopy(broken.quant.get_submodule(second)))
    check = e2e.check_logits(broken, PROMPT)
    assert not check.passed
    assert check.max_gemm_error_ratio > 1 and check.logits_rel_err > check.logits_tolerance


def test_static_cache_decoding_gives_the_tokens_of_a_full_recomputation(models):
    model = copy.deepcopy(models.twin)
    e2e.set_parameter_dtype(model, torch.float32)  # fp32: no near-ties between the two orders of rounding
    prompt = torch.randint(0, model.config.vocab_size, (2, PROMPT), generator=torch.Generator().manual_seed(0))
    tokens = e2e.Decoder(model, 2, PROMPT + NEW).generate(prompt, NEW)
    assert tokens.shape == (2, NEW)
    seq = prompt
    with torch.no_grad():
        for _ in range(NEW):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(tokens, seq[:, PROMPT:])


def test_the_compiled_decoder_runs_without_graph_breaks_and_computes_the_same_function(models):
    """torch.compile(fullgraph=True) of the whole MarlinLinear model (a graph break would
    raise): decoding with the static cache runs, and the logits agree with eager ones to
    fp16 accuracy (inductor fuses and reorders the non-GEMM fp16 arithmetic, so tokens of
    a random tiny model may differ at near-ties)."""
    prompt = torch.randint(0, models.quant.config.vocab_size, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    tokens = e2e.Decoder(models.quant, 2, PROMPT + NEW, compiled=True).generate(prompt, NEW)
    assert tokens.shape == (2, NEW)
    with torch.no_grad():
        eager = models.quant(prompt, use_cache=False).logits.float()
        compiled = torch.compile(models.quant.forward, fullgraph=True)(prompt, use_cache=False).logits.float()
    assert (compiled - eager).norm() <= 1e-2 * eager.norm()


def test_timing_a_step_leaves_the_cache_at_its_position(models):
    decoder = e2e.Decoder(models.quant, 1, PROMPT + NEW)
    decoder.generate(torch.zeros((1, PROMPT), dtype=torch.long), NEW)
    t = decoder.time_step("cpu")
    assert t.median_us > 0 and t.method == "host-clock"
    assert all(int(layer.cumulative_length) == PROMPT + NEW - 1 for layer in decoder.cache.layers)


def test_big_dimensions_are_refused_on_a_cpu():
    with pytest.raises(ValueError, match="needs a GPU"):
        e2e.run(describe_machine("cpu"), e2e.E2EConfig(dims="7b", new_tokens=NEW, prompt_len=PROMPT))


def test_cli_prints_a_table_and_writes_json(tmp_path):
    out = tmp_path / "e2e.jsonl"
    args = ["e2e", "--dims", "tiny", "--batch", "1", "2", "--tokens", str(NEW), "--prompt-len", "8", "--json", str(out)]
    result = subprocess.run([sys.executable, "-m", "steps", *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "correctness (ok)" in result.stdout and "real numbers need a GPU" in result.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["batch"], r["model"]) for r in rows} == {(b, m) for b in (1, 2) for m in ("fp16", "s0_numpy")}
    assert all(r["kind"] == "e2e" and r["tokens_per_s"] > 0 and {"date", "gpu", "versions"} <= r.keys() for r in rows)


def test_sparse_models_prune_both_twins_and_pass_the_check(tmp_path):
    sparse = e2e.build_models(e2e.E2EConfig(layers=1, sparse=True), "cpu")
    for name in sparse.replaced:
        layer = sparse.quant.get_submodule(name)
        assert isinstance(layer, MarlinLinear) and layer.sparse
        w = sparse.twin.get_submodule(name).weight  # (N, K): 2:4 along K
        assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()
    assert e2e.check_logits(sparse, PROMPT).passed
    out = tmp_path / "sparse.jsonl"
    args = ["e2e", "--dims", "tiny", "--layers", "1", "--batch", "1", "--tokens", "2", "--prompt-len", "4", "--sparse",
            "--json", str(out)]  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "steps", *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(json.loads(line)["sparse"] for line in out.read_text().splitlines())


def test_fusing_the_projections_computes_the_same_function_with_and_without_the_cache(models):
    """fuse_projections concatenates the real weights: the fused model's logits equal the
    unfused one's (the same dot products, one GEMM instead of three or two), and
    decoding through the static cache gives the same tokens. fp32, so that no near-tie
    between two GEMM blockings can flip a token."""
    model = copy.deepcopy(models.twin)
    e2e.set_parameter_dtype(model, torch.float32)
    fused = copy.deepcopy(model)
    e2e.fuse_projections(fused)
    assert len(e2e.block_linears(fused)) == 4 * LAYERS  # q|k|v, o, gate|up, down per block
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # k and v narrower than q
    prompt = torch.randint(0, model.config.vocab_size, (2, PROMPT), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        separate, together = model(prompt, use_cache=False).logits, fused(prompt, use_cache=False).logits
    assert torch.allclose(together, separate, rtol=1e-5, atol=1e-5)
    expected = e2e.Decoder(model, 2, PROMPT + NEW).generate(prompt, NEW)
    assert torch.equal(e2e.Decoder(fused, 2, PROMPT + NEW).generate(prompt, NEW), expected)


def test_the_fused_models_decode_with_grouped_attention(models, monkeypatch):
    """Both paths compute the same function, so only a count shows which one ran: every
    decode step of every block, in both eval-mode models, goes through grouped_decode_attention."""
    fused = copy.deepcopy(models.twin)
    e2e.fuse_projections(fused)
    assert not any(m.training for m in fused.modules())
    calls = []
    grouped = fusion.grouped_decode_attention
    monkeypatch.setattr(fusion, "grouped_decode_attention", lambda *args: calls.append(1) or grouped(*args))
    prompt = torch.randint(0, fused.config.vocab_size, (2, PROMPT), generator=torch.Generator().manual_seed(4))
    e2e.Decoder(fused, 2, PROMPT + NEW).generate(prompt, NEW)
    assert len(calls) == (NEW - 1) * LAYERS


def test_fused_models_pass_the_check_and_compile_without_graph_breaks():
    fused = e2e.build_models(e2e.E2EConfig(layers=1, fused=True), "cpu")
    assert {name.rsplit(".", 1)[1] for name in fused.replaced} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert all(isinstance(fused.quant.get_submodule(name), MarlinLinear) for name in fused.replaced)
    check = e2e.check_logits(fused, PROMPT)
    assert check.passed, e2e.format_check(check)
    prompt = torch.randint(0, fused.quant.config.vocab_size, (2, PROMPT), generator=torch.Generator().manual_seed(3))
    tokens = e2e.Decoder(fused.quant, 2, PROMPT + NEW, compiled=True).generate(prompt, NEW)
    assert torch.equal(tokens, e2e.Decoder(fused.quant, 2, PROMPT + NEW).generate(prompt, NEW))


def test_building_copies_no_weight_it_replaces(monkeypatch):
    """The quantized model is a copy of the twin whose block linear layers are then replaced:
    copying those weights first would hold two FP16 models at once (70B dims: 1.7 GB a layer)."""
    copied = []
    deepcopy = torch.nn.Parameter.__deepcopy__
    monkeypatch.setattr(torch.nn.Parameter, "__deepcopy__", lambda p, memo: copied.append(id(p)) or deepcopy(p, memo))
    models = e2e.build_models(e2e.E2EConfig(layers=1), "cpu")
    replaced = {id(models.twin.get_submodule(name).weight) for name in models.replaced}
    assert copied and not replaced & set(copied)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_grouped_decode_attention_equals_attention_over_copied_kv_heads(kv_heads):
    """The fused model's decode attention against SDPA with every k/v head copied for its
    query heads (what transformers computes), with a mask that hides the cache's tail
    differently per sequence: a wrong grouping or mask broadcast changes the result."""
    B, H, L, D = 3, 4, 10, 8
    gen = torch.Generator().manual_seed(kv_heads)
    q = torch.randn((B, H, 1, D), generator=gen)
    k, v = (torch.randn((B, kv_heads, L, D), generator=gen) for _ in range(2))
    mask = torch.arange(L) < torch.tensor([L, 6, 3])[:, None]  # sequence b sees a prefix of its cache
    mask = mask[:, None, None, :]
    per_head = torch.rand((B, H, 1, L), generator=gen) < 0.7  # a different mask for every query head
    per_head[..., 0] = True
    additive = torch.randn((1, 1, 1, L), generator=gen)  # a float mask, shared by the batch
    copied = [t.repeat_interleave(H // kv_heads, dim=1) for t in (k, v)]
    for m in (mask, per_head, additive, None):
        expected = F.scaled_dot_product_attention(q, *copied, attn_mask=m).transpose(1, 2).reshape(B, 1, H * D)
        assert torch.allclose(e2e.grouped_decode_attention(q, k, v, m), expected, rtol=1e-5, atol=1e-6)


def test_each_batch_is_handed_over_as_soon_as_it_is_measured():
    """The CLI writes each batch's rows when they arrive, so a run cut short keeps them."""
    handed = []
    _, rows = e2e.run(describe_machine("cpu"), e2e.E2EConfig(layers=1, batches=(2, 1), new_tokens=2, prompt_len=4),
                      on_batch=handed.append)
    assert [[r.batch for r in batch_rows] for batch_rows in handed] == [[2, 2], [1, 1]]
    assert [r for batch_rows in handed for r in batch_rows] == rows
