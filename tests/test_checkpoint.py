"""Quantized checkpoint directories, written here and loaded through steps.torch.load_quantized.

The checkpoints are made on the spot, never downloaded: a tiny Llama and a tiny Qwen2
(transformers config objects, random weights), every decoder linear layer quantized with
the reference quantizer and written in GPTQ (v1 and v2, with and without act-order,
symmetric and asymmetric) or AWQ (GEMM) layout by reference/formats.py's packers, the rest
as fp16 tensors, in one safetensors file or in shards with an index. The loaded model's
logits are compared with an FP32 model whose linear layers hold the dequantized weights:
the only differences are fp16 activations and products (the loaded model runs in fp16),
so the tolerance is LOGIT_TOLERANCE of the largest logit. Malformed checkpoints must stop
the load with an error naming the tensor.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import reference as ref  # noqa: E402
from reference.formats import dequantize_checkpoint_order, group_index, act_order_permutation  # noqa: E402
from steps.torch import load_quantized  # noqa: E402
from steps.torch.checkpoint import QuantizationConfig, QuantizedLayer, save_quantized  # noqa: E402
from steps.torch.layer import MarlinLinear  # noqa: E402

# fp16 rounding of activations through two small blocks: well under 1% of the largest logit.
LOGIT_TOLERANCE = 1e-2
GROUP_SIZE = 32
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=96, max_position_embeddings=64)  # fmt: skip


def tiny_config(arch):
    if arch == "llama":
        return transformers.LlamaConfig(**TINY, tie_word_embeddings=False)
    return transformers.Qwen2Config(**TINY, tie_word_embeddings=True)  # Qwen2 has q/k/v biases; tied head


def reference_model(arch, seed):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5 if p.dim() == 1 else 1 / np.sqrt(p.shape[-1]))
    return model.eval()


def write_checkpoint(tmp_path, arch, qc, seed=0, shard_bytes=None):
    """Quantize `arch`'s decoder linears into a checkpoint; return (directory, FP32 model of
    the dequantized weights)."""
    model = reference_model(arch, seed)
    rng = np.random.default_rng(seed)
    layers = {}
    for name, linear in model.model.layers.named_modules(prefix="model.layers"):
        if not isinstance(linear, torch.nn.Linear):
            continue
        W = linear.weight.detach().numpy().T  # (K, N)
        perm = None
        if qc.desc_act:
            perm = act_order_permutation(group_index(W.shape[0], qc.group_size, rng.permutation(W.shape[0])), W.shape[0], qc.group_size)
        qw = ref.quantize(W if perm is None else W[perm], qc.group_size, symmetric=qc.sym)
        layers[name] = QuantizedLayer(qw, perm, linear.bias)
        with torch.no_grad():  # the FP32 model holds exactly the weights the checkpoint stores
            linear.weight.copy_(torch.from_numpy(dequantize_checkpoint_order(qw, perm).astype(np.float32).T))
    others = {k: v.half() for k, v in model.state_dict().items() if k.rpartition(".")[0] not in layers}
    if model.config.tie_word_embeddings:
        others.pop("lm_head.weight")
    with torch.no_grad():  # the reference sees the fp16-rounded plain weights too
        for p in model.parameters():
            p.copy_(p.half().float())
        for name, layer in layers.items():
            if layer.bias is not None:
                model.get_submodule(name).bias.copy_(layer.bias.half().float())
    save_quantized(tmp_path, model.config, layers, others, qc, shard_bytes=shard_bytes)
    return tmp_path, model


def max_logit_error(loaded, reference_fp32, device="cpu", seed=0):
    ids = torch.from_numpy(np.random.default_rng(seed).integers(0, TINY["vocab_size"], (2, 7)))
    with torch.no_grad():
        got = loaded(ids.to(device)).logits.float().cpu()
        want = reference_fp32(ids).logits
    return float((got - want).abs().max() / want.abs().max())


CASES = [
    ("llama", QuantizationConfig("gptq", group_size=GROUP_SIZE)),
    ("llama", QuantizationConfig("gptq", group_size=GROUP_SIZE, desc_act=True)),
    ("llama", QuantizationConfig("gptq", group_size=-1, sym=False, checkpoint_format="gptq_v2")),
    ("llama", QuantizationConfig("awq", group_size=GROUP_SIZE, sym=False, checkpoint_format="gemm")),
    ("qwen2", QuantizationConfig("gptq", group_size=GROUP_SIZE, desc_act=True, sym=False)),
    ("qwen2", QuantizationConfig("awq", group_size=GROUP_SIZE, sym=False, checkpoint_format="gemm")),
]


@pytest.mark.parametrize("arch, qc", CASES, ids=lambda c: getattr(c, "method", c) if not isinstance(c, str) else c)
def test_loaded_checkpoint_matches_the_dequantized_fp32_model(tmp_path, arch, qc):
    directory, fp32 = write_checkpoint(tmp_path, arch, qc)
    model = load_quantized(directory)
    linears = [m for m in model.model.layers.modules() if isinstance(m, MarlinLinear)]
    assert len(linears) == 7 * TINY["num_hidden_layers"] and all(m.step == "s0_numpy" for m in linears)
    assert all((m.perm is not None) == qc.desc_act for m in linears)
    assert max_logit_error(model, fp32) <= LOGIT_TOLERANCE


def test_sharded_checkpoint_with_index_loads_the_same(tmp_path):
    qc = QuantizationConfig("gptq", group_size=GROUP_SIZE, checkpoint_format="gptq_v2")
    directory, fp32 = write_checkpoint(tmp_path, "llama", qc, shard_bytes=20_000)
    assert len(list(directory.glob("model-*.safetensors"))) > 2
    assert max_logit_error(load_quantized(directory), fp32) <= LOGIT_TOLERANCE


# -- malformed checkpoints --------------------------------------------------------------------------

GPTQ = QuantizationConfig("gptq", group_size=GROUP_SIZE)
LAYER = "model.layers.0.mlp.down_proj"  # K = 128, N = 64


def rewrite(directory, change):
    """Apply change(tensors) to the single-file checkpoint in place."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(directory / "model.safetensors")
    change(tensors)
    save_file(tensors, directory / "model.safetensors")


def set_config(directory, **quantization):
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"].update(quantization)
    (directory / "config.json").write_text(json.dumps(config))


MALFORMED = {
    "missing": (lambda t: t.pop(f"{LAYER}.scales"), ValueError, f"checkpoint lacks tensor {LAYER}.scales"),
    "missing plain": (lambda t: t.pop("model.norm.weight"), ValueError, r"lacks tensors the model needs: model.norm.weight \(64,\)"),
    "extra": (lambda t: t.update(stray=torch.zeros(3)), ValueError, "tensors the model does not: stray"),
    "truncated qweight": (lambda t: t.update({f"{LAYER}.qweight": t[f"{LAYER}.qweight"][:10]}), ValueError,
                          f"layer {LAYER}: qweight has 10 rows, expected K/8 = 16 for K = 128"),
    "wrong dtype": (lambda t: t.update({f"{LAYER}.qweight": t[f"{LAYER}.qweight"].float()}), TypeError,
                    f"layer {LAYER}: qweight must be int32"),
    "NaN scales": (lambda t: t[f"{LAYER}.scales"].fill_(float("nan")), ValueError,
                   f"layer {LAYER}: scales holds 256 non-finite values"),
    "mis-shaped plain": (lambda t: t.update({"model.norm.weight": torch.ones(65, dtype=torch.float16)}), ValueError,
                         r"tensor model.norm.weight has shape \(65,\), expected \(64,\)"),
    "quantized but not linear": (lambda t: t.update({"model.norm.qweight": torch.zeros(8, 64, dtype=torch.int32)}), ValueError,
                                 "model.norm.qweight but the model has no linear layer model.norm"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_checkpoint_names_the_tensor(tmp_path, case):
    change, error, message = MALFORMED[case]
    directory, _ = write_checkpoint(tmp_path, "llama", GPTQ)
    rewrite(directory, change)
    with pytest.raises(error, match=message):
        load_quantized(directory)


@pytest.mark.parametrize(
    "quantization, message",
    [
        (dict(bits=8), "only 4-bit checkpoints are supported, this one has bits=8"),
        (dict(quant_method="exl2"), "quant_method 'exl2' is not supported"),
        (dict(checkpoint_format="marlin"), "GPTQ checkpoint_format 'marlin' is not supported"),
        (dict(checkpoint_format="gptq_v2"), "sym=true but layer .* zero points other than 8"),
        (dict(desc_act=True), "lacks tensor model.layers.0.mlp.down_proj.g_idx .*act-order"),
        (dict(group_size=64), "layer model.layers.0.mlp.down_proj: scales has 4 rows, expected K/group_size = 2 for K = 128"),
    ],
)
def test_unsupported_or_inconsistent_configs_are_refused(tmp_path, quantization, message):
    directory, _ = write_checkpoint(tmp_path, "llama", GPTQ)
    set_config(directory, **quantization)
    if quantization.get("desc_act"):
        rewrite(directory, lambda t: [t.pop(k) for k in list(t) if k.endswith(".g_idx")])
    with pytest.raises(ValueError, match=message):
        load_quantized(directory)


def test_truncated_file_and_missing_files_are_clear(tmp_path):
    directory, _ = write_checkpoint(tmp_path, "llama", GPTQ)
    data = (directory / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read model.safetensors"):
        load_quantized(directory)
    (directory / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="has neither model.safetensors nor model.safetensors.index.json"):
        load_quantized(directory)
    with pytest.raises(ValueError, match="has no config.json"):
        load_quantized(tmp_path / "nowhere")


def test_generate_command_decodes_from_a_checkpoint_without_tokenizer(tmp_path, capsys):
    from steps.harness.cli import main

    directory, _ = write_checkpoint(tmp_path / "ckpt", "qwen2", QuantizationConfig("awq", group_size=GROUP_SIZE, sym=False, checkpoint_format="gemm"))
    results = tmp_path / "out" / "generate.jsonl"
    assert main(["generate", "--checkpoint", str(directory), "--prompt", "1 2 3", "--max-new-tokens", "4", "--json", str(results), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "No tokenizer in the checkpoint" in out and "tokens/s" in out
    row = json.loads(results.read_text())
    assert row["new_tokens"] == 4 and row["rungs"] == ["s0_numpy"] and row["quantization"]["quant_method"] == "awq"
    assert main(["generate", "--checkpoint", str(directory), "--prompt", "hello"]) == 2
    assert "--prompt must be token ids" in capsys.readouterr().err


def test_greedy_decode_continues_the_reference_models_tokens(tmp_path):
    from steps.torch.generate import greedy_decode

    directory, fp32 = write_checkpoint(tmp_path, "llama", GPTQ)
    got = greedy_decode(load_quantized(directory), [1, 2, 3], 5, progress=False)
    with torch.no_grad():
        want = fp32.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False)[0, 3:].tolist()
    assert got.new_tokens == want and got.prompt_tokens == 3


def test_synthetic_checkpoint_writer_makes_a_loadable_sharded_checkpoint(tmp_path):
    from steps.torch.generate import greedy_decode, write_synthetic_checkpoint

    qc = write_synthetic_checkpoint(tmp_path, "tiny", layers=2, group_size=GROUP_SIZE)
    model = load_quantized(tmp_path)
    assert qc.method == "gptq" and model.config.num_hidden_layers == 2
    assert len(greedy_decode(model, [1, 2], 3, progress=False).new_tokens) == 3


@pytest.mark.gpu
@pytest.mark.parametrize("arch, qc", CASES, ids=lambda c: getattr(c, "method", c) if not isinstance(c, str) else c)
def test_loaded_checkpoint_on_the_gpu_matches_the_dequantized_fp32_model(tmp_path, arch, qc):
    directory, fp32 = write_checkpoint(tmp_path, arch, qc)
    model = load_quantized(directory, "cuda")
    steps_used = {m.step for m in model.modules() if isinstance(m, MarlinLinear)}
    assert steps_used and all(name not in ("s0_numpy", "s1_numba_naive") for name in steps_used)
    assert max_logit_error(model, fp32, "cuda") <= LOGIT_TOLERANCE


@pytest.mark.parametrize("command", ["e2e", "generate"])
def test_commands_without_transformers_say_what_to_install(monkeypatch, capsys, command):
    import importlib.util

    from steps.harness.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    assert main([command, "--synthetic-7b"] if command == "generate" else [command]) == 2
    assert f"`python -m steps {command}` needs transformers: pip install transformers" in capsys.readouterr().err


def test_generate_command_uses_the_checkpoints_tokenizer(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from steps.harness.cli import main

    directory, _ = write_checkpoint(tmp_path, "llama", GPTQ)
    vocab = {f"w{i}": i for i in range(TINY["vocab_size"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(directory)
    assert main(["generate", "--checkpoint", str(directory), "--prompt", "w1 w2 w3", "--max-new-tokens", "3", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "No tokenizer" not in out and "prefill of 3 tokens" in out
    assert len(out.splitlines()[0].split()) == 3  # three decoded words
