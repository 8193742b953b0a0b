"""Tokens from a quantized checkpoint: greedy decoding with a progress bar, and its speed.

`python -m steps generate --checkpoint DIR --prompt ...` loads DIR with load_quantized,
decodes greedily (one prefill of the prompt, then one token per step through the KV
cache) and prints the text, or the token ids when DIR has no tokenizer, with the prefill
time and the decode speed in tokens/s. `--synthetic-7b` first writes, into a temporary
directory, a GPTQ checkpoint with Llama-2-7B dimensions and random weights (as few
decoder layers as `--layers` says, so that writing, loading and packing fit a short GPU
run) by the same writer the tests use, and decodes from that: the end-to-end check that
a 7B-sized checkpoint goes through load_quantized onto the fastest rung and decodes.
Its figures go out as JSON lines naming the GPU, the versions and the date.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from reference import random_quantized_weight

from .checkpoint import QuantizationConfig, QuantizedLayer, load_quantized, save_quantized
from .layer import MarlinLinear

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
SYNTHETIC_LAYERS = 8  # of Llama-2-7B's 32: writing and packing 32 random layers takes minutes
DEFAULT_TEXT_PROMPT = "The capital of France is"
DEFAULT_ID_PROMPT = "1 450 7483 310 3444 338"  # token ids, for checkpoints without a tokenizer
WEIGHT_POOL = 2  # distinct random weights per layer shape, reused down the layers (random draws are slow)


@dataclass
class Generation:
    """One greedy decode: the new token ids and how long it took."""

    prompt_tokens: int
    new_tokens: list[int]
    prefill_s: float
    decode_s: float  # the steps after the first new token (which the prefill produced)

    @property
    def decode_tokens_per_s(self) -> float:
        steps = len(self.new_tokens) - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def greedy_decode(model: nn.Module, prompt_ids: list[int], max_new_tokens: int, progress: bool = True) -> Generation:
    """Decode `max_new_tokens` tokens greedily after `prompt_ids` (batch 1), with a tqdm bar."""
    from tqdm import tqdm
    from transformers import DynamicCache

    from .e2e.decoding import _cache_keyword  # the cache argument's name differs between transformers versions

    if not prompt_ids:
        raise ValueError("the prompt is empty; give at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([prompt_ids], device=device)
    cache = {_cache_keyword(model): DynamicCache(config=model.config)}
    with torch.inference_mode():
        _synchronize(device)
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, **cache)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        _synchronize(device)
        prefill_s = time.perf_counter() - start
        tokens = [token]
        start = time.perf_counter()
        for _ in tqdm(range(max_new_tokens - 1), desc="decode", unit="tok", disable=not progress, leave=False):
            out = model(input_ids=token, use_cache=True, **cache)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
        _synchronize(device)
        decode_s = time.perf_counter() - start
    return Generation(len(prompt_ids), torch.cat(tokens, 1)[0].tolist(), prefill_s, decode_s)


def load_tokenizer(directory: Path):
    """The directory's tokenizer, or None when it has none."""
    if not any((directory / name).exists() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def prompt_token_ids(prompt: str, tokenizer, vocab_size: int) -> list[int]:
    """The prompt through the tokenizer, or, without one, as whitespace-separated token ids."""
    if tokenizer is not None:
        return tokenizer(prompt)["input_ids"]
    try:
        ids = [int(word) for word in prompt.split()]
    except ValueError:
        raise ValueError(
            f"this checkpoint has no tokenizer ({' / '.join(TOKENIZER_FILES)}), so --prompt must be token ids "
            f"separated by spaces, e.g. --prompt '1 450 7483', got {prompt!r}"
        ) from None
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"token ids must lie in 0..{vocab_size - 1} (the model's vocabulary), got {bad[:5]}")
    return ids


# -- a synthetic checkpoint of real dimensions -------------------------------------------------------


def write_synthetic_checkpoint(directory: Path, dims: str = "7b", layers: int = SYNTHETIC_LAYERS, group_size: int = 128,
                               seed: int = 0) -> QuantizationConfig:  # fmt: skip
    """A GPTQ (v1, symmetric, no act-order) checkpoint of a Llama of `dims` with random weights."""
    from transformers import LlamaForCausalLM

    from .e2e import llama_config

    config = llama_config(dims, layers)
    with torch.device("meta"):
        meta = LlamaForCausalLM(config)
    rng = np.random.default_rng(seed)
    pool: dict[tuple[int, int], list] = {}
    quantized = {}
    for name, module in meta.model.layers.named_modules(prefix="model.layers"):
        if isinstance(module, nn.Linear):
            shape = (module.in_features, module.out_features)
            choices = pool.setdefault(shape, [])
            if len(choices) < WEIGHT_POOL:
                choices.append(QuantizedLayer(random_quantized_weight(rng, *shape, group_size, centered=True)))
            quantized[name] = choices[len(quantized) % len(choices)]
    generator = torch.Generator().manual_seed(seed)
    others = {}
    for key, value in meta.state_dict().items():
        if key.rpartition(".")[0] in quantized:
            continue
        if key.endswith("norm.weight"):
            others[key] = torch.ones(value.shape, dtype=torch.float16)
        else:  # embedding and output head
            others[key] = torch.randn(value.shape, generator=generator, dtype=torch.float16) / value.shape[-1] ** 0.5
    qc = QuantizationConfig("gptq", group_size=group_size)
    save_quantized(directory, config, quantized, others, qc, shard_bytes=2 << 30)
    return qc


@dataclass
class GenerateRow:
    """One JSON line of `python -m steps generate --json`."""

    checkpoint: str
    layers: int
    quantization: dict
    rungs: list
    load_s: float
    prompt_tokens: int
    new_tokens: int
    prefill_ms: float
    decode_tokens_per_s: float


def run(args) -> int:
    """The `generate` subcommand (arguments in steps/harness/cli.py)."""
    from ..harness import bench

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    layers = args.layers or SYNTHETIC_LAYERS
    with tempfile.TemporaryDirectory() as scratch:
        if args.synthetic_7b:
            directory = Path(scratch)
            start = time.perf_counter()
            write_synthetic_checkpoint(directory, "7b", layers, seed=args.seed)
            print(f"Wrote a random GPTQ checkpoint with Llama-2-7B dimensions and {layers} of its 32 decoder layers "
                  f"in {time.perf_counter() - start:.1f} s.")  # fmt: skip
        else:
            directory = Path(args.checkpoint)
        start = time.perf_counter()
        model = load_quantized(directory, device, step=args.rung)
        _synchronize(device)
        load_s = time.perf_counter() - start
        quantization = json.loads((directory / "config.json").read_text())["quantization_config"]
        tokenizer = load_tokenizer(directory)
    if tokenizer is None:
        print("No tokenizer in the checkpoint: the prompt is read as token ids, and the output printed as token ids.")
    prompt = args.prompt if args.prompt is not None else (DEFAULT_TEXT_PROMPT if tokenizer is not None else DEFAULT_ID_PROMPT)
    ids = prompt_token_ids(prompt, tokenizer, model.config.vocab_size)
    generation = greedy_decode(model, ids, args.max_new_tokens, progress=not args.quiet)
    rungs = sorted({m.step for m in model.modules() if isinstance(m, MarlinLinear)})
    print(tokenizer.decode(generation.new_tokens) if tokenizer is not None else " ".join(map(str, generation.new_tokens)))
    print(f"loaded in {load_s:.1f} s on {device} ({', '.join(rungs)}); prefill of {len(ids)} tokens "
          f"{generation.prefill_s * 1e3:.1f} ms; decode {generation.decode_tokens_per_s:.1f} tokens/s "
          f"(batch 1, {len(generation.new_tokens)} new tokens)")  # fmt: skip
    if args.json:
        import transformers

        machine = bench.describe_machine(device.type)
        machine.versions["transformers"] = transformers.__version__
        name = "synthetic-7b" if args.synthetic_7b else directory.resolve().name
        row = GenerateRow(name, model.config.num_hidden_layers, quantization, rungs, round(load_s, 2), len(ids),
                          len(generation.new_tokens), round(generation.prefill_s * 1e3, 3),
                          round(generation.decode_tokens_per_s, 2))  # fmt: skip
        with open(args.json, "a") as f:
            f.writelines(line + "\n" for line in bench.json_lines([row], machine))
    return 0
