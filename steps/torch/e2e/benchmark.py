"""The benchmark: build both models, check them, and time greedy decoding at each batch size.

tokens/s = batch / decode-step time. Each row is one model at one batch size and repeats
the run's E2EConfig; in a tensor-parallel run every rank measures its own step (the ranks
wait for each other in the all-reduces) and rank 0's rows are reported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ...harness.bench import Machine
from ...harness.timing import AFTER_ANOTHER_KERNEL
from .breakdown import attention_us, linear_us
from .config import E2EConfig
from .correctness import Check, check_logits
from .decoding import Decoder
from .fusion import attention_kind
from .models import build_models


@dataclass
class Row:
    """One model at one batch size."""

    kind: str  # "e2e", so these lines are never mistaken for steps.harness.bench rows
    dims: str
    layers: int
    batch: int
    prompt_len: int
    new_tokens: int
    max_cache_len: int
    group_size: int
    sparse: bool  # weights pruned 2:4 (in the FP16 twin too)
    compiled: bool  # both models' decode step under torch.compile(fullgraph=True)
    fused: bool  # q|k|v and gate|up as one layer each, in both models
    decode_attention: str  # attention_kind: "triton", "grouped" or "transformers"
    tp: int  # tensor-parallel ranks, both models sharded alike (1: one device)
    model: str  # "fp16" or the rung(s) of the MarlinLinear layers
    step_us: float
    q1_us: float
    q3_us: float
    method: str
    tokens_per_s: float
    speedup_vs_fp16: float
    linear_us: float  # of this rank's shards, collectives not included
    attention_us: float  # of this rank's heads
    rest_us: float
    greedy_agreement: float  # share of generated tokens equal to the FP16 twin's
    max_gemm_error_ratio: float
    logits_rel_err: float
    fp16_logits_rel_err: float
    logits_tolerance: float
    # How linear_us was timed (breakdown.linear_us); rows before 2026-12-04's round 11 lack it and
    # were timed back to back.
    linear_timing: str = AFTER_ANOTHER_KERNEL


def run(
    machine: Machine,
    config: E2EConfig,
    group: dist.ProcessGroup | None = None,
    on_batch: Callable[[list[Row]], None] | None = None,
) -> tuple[Check, list[Row]]:
    """Build both models, check them, and time decoding at each batch size (no rows if the check fails).

    `group` is the tensor-parallel group when config.tp > 1. `on_batch` receives each batch
    size's rows as soon as they are measured, so that a run stopped by a time limit keeps
    the batches it finished."""
    config.validate(machine.device)
    models = build_models(config, machine.device, group)
    check = check_logits(models, config.prompt_len, config.seed)
    if not check.passed:
        return check, []
    max_len = config.prompt_len + config.new_tokens
    local_config = models.twin.config  # one rank's heads under tensor parallelism
    rng = np.random.default_rng(config.seed + 1)
    rows: list[Row] = []
    for batch in config.batches:
        batch_rows = []
        prompt = torch.from_numpy(rng.integers(0, local_config.vocab_size, (batch, config.prompt_len))).to(machine.device)
        timed = {}
        for label, model in (("fp16", models.twin), (models.rung, models.quant)):
            decoder = Decoder(model, batch, max_len, config.compiled)
            tokens = decoder.generate(prompt, config.new_tokens)
            timed[label] = (decoder.time_step(machine.device), tokens)
            del decoder
            if machine.device == "cuda":
                torch.cuda.empty_cache()
        attn = attention_us(local_config, machine, batch, max_len)
        base_t, base_tokens = timed["fp16"]
        for label, model in (("fp16", models.twin), (models.rung, models.quant)):
            t, tokens = timed[label]
            lin = linear_us(model, models.replaced, batch, machine.device)
            batch_rows.append(Row(
                "e2e", config.dims, local_config.num_hidden_layers, batch, config.prompt_len, config.new_tokens, max_len,
                config.group_size, config.sparse, config.compiled, config.fused,
                attention_kind(config.fused, machine.device), config.tp, label,
                t.median_us, t.q1_us, t.q3_us, t.method, batch / (t.median_us * 1e-6),
                base_t.median_us / t.median_us, lin, attn, t.median_us - lin - attn,
                float((tokens == base_tokens).float().mean()), check.max_gemm_error_ratio, check.logits_rel_err,
                check.fp16_logits_rel_err, check.logits_tolerance,
            ))  # fmt: skip
        rows += batch_rows
        if on_batch is not None:
            on_batch(batch_rows)
    return check, rows


def format_table(rows: list[Row], machine: Machine) -> str:
    first = rows[0]
    head = (
        f"{machine.name} ({machine.device}); Llama {first.dims} dims, {first.layers} layers, prompt {first.prompt_len}, "
        f"{first.new_tokens} new tokens, static cache {first.max_cache_len}, group size {first.group_size}"
        + (f", tensor-parallel over {first.tp} ranks (rank 0's times)" if first.tp > 1 else "")
    )
    cols = (
        f"{'batch':>5}  {'model':<16} {'step ms':>9} {'IQR%':>5} {'tok/s':>10} {'x FP16':>7} "
        f"{'linear ms':>10} {'attn ms':>8} {'rest ms':>8} {'agree':>6}  method"
    )
    lines = [head, cols, "-" * len(cols)]
    for r in rows:
        lines.append(
            f"{r.batch:>5}  {r.model:<16} {r.step_us / 1e3:>9.3f} {100 * (r.q3_us - r.q1_us) / r.step_us:>5.1f} "
            f"{r.tokens_per_s:>10.1f} {r.speedup_vs_fp16:>7.2f} {r.linear_us / 1e3:>10.3f} {r.attention_us / 1e3:>8.3f} "
            f"{r.rest_us / 1e3:>8.3f} {r.greedy_agreement:>6.2f}  {r.method}"
        )
    return "\n".join(lines)
