"""Is the MarlinLinear model right? Checked on one forward pass of a short random prompt.

A per-element bound for one GEMM, reference.error_bound, holds for a product whose inputs
are exact; in a network the inputs of layer 2 already differ between the two models by
layer 1's rounding, and every later norm, softmax and residual add propagates and amplifies
those differences by factors (the network's sensitivity) that no per-GEMM bound knows. Two
checks replace it:

1. Every MarlinLinear call in that forward pass, on the activations it actually received,
   meets its rung's bound c * u * (|A| @ |W|) against the dequantized weight (a subset of
   columns, as steps.harness.bench does). This is the kernel check, and it is rigorous.
   In a tensor-parallel model the call is a rank's shard (a row-parallel layer's local
   GEMM, before the all-reduce).
2. The logits, relative to an FP32 evaluation of the twin (the same weights, fp16 -> fp32
   is exact): e_q = ||L_marlin - L_fp32|| / ||L_fp32|| must not exceed
   KAPPA * max(1, c / 2) * e_16, where e_16 is the same distance for the FP16 twin. To first
   order the logits' error is a sum over every rounding in the network of (sensitivity x
   local error); swapping the GEMMs changes only the GEMM terms, whose bound grows from
   c = 2 (fp32 accumulation, one rounding) to the rung's c, so the measured e_16 scaled by
   max(1, c / 2) estimates what the quantized model may show; KAPPA = 2 allows for these
   being random sums, not worst cases. A wrong layout, transpose, shard or cache bug gives
   an error of order one, far above this.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from reference import error_excess

from ...harness.bench import CHECK_COLUMNS
from ...registry import get
from .models import Models, set_parameter_dtype

KAPPA = 2.0  # safety factor of the logits criterion (check 2)
CHECK_BATCH = 2


@dataclass
class Check:
    max_gemm_error_ratio: float  # max over every MarlinLinear call of error / rung bound (<= 1 passes)
    logits_rel_err: float  # e_q: MarlinLinear model vs FP32 twin
    fp16_logits_rel_err: float  # e_16: FP16 twin vs FP32 twin
    logits_tolerance: float  # KAPPA * max(1, c / 2) * e_16

    @property
    def passed(self) -> bool:
        return self.max_gemm_error_ratio <= 1.0 and self.logits_rel_err <= self.logits_tolerance


@contextmanager
def _fp32_one_block_at_a_time(model: nn.Module) -> Iterator[None]:
    """Evaluate an FP16 LlamaForCausalLM in FP32 while holding only one decoder block's
    weights in FP32 at a time (fp16 -> fp32 -> fp16 is exact): the whole model in FP32 would
    take twice its FP16 size beside it, which would halve the 70B layers that fit a GPU."""
    dtypes = {p: p.dtype for p in model.parameters()}
    hooks = []
    try:
        for block in model.model.layers:
            hooks.append(block.register_forward_pre_hook(lambda m, args: set_parameter_dtype(m, torch.float32)))
            hooks.append(block.register_forward_hook(lambda m, args, out: set_parameter_dtype(m, torch.float16)))
        for name, p in model.named_parameters():
            if ".layers." not in f".{name}":
                p.data = p.data.float()
        yield
    finally:
        for h in hooks:
            h.remove()
        for p, dtype in dtypes.items():
            p.data = p.data.to(dtype)


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(x).all():
        return math.inf
    return float(torch.linalg.vector_norm(x.double() - ref.double()) / torch.linalg.vector_norm(ref.double()))


@torch.no_grad()
def check_logits(models: Models, prompt_len: int, seed: int = 0) -> Check:
    """One forward pass of a random prompt through both models; see the module docstring."""
    rng = np.random.default_rng(seed)
    device = models.twin.device
    ids = torch.from_numpy(rng.integers(0, models.twin.config.vocab_size, (CHECK_BATCH, prompt_len))).to(device)
    calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    hooks = [
        models.quant.get_submodule(name).register_forward_hook(
            # A copy of y: a row-parallel layer all-reduces its local GEMM's output in place.
            lambda m, args, y, name=name: calls.append((name, args[0].detach(), y.detach().clone()))
        )
        for name in models.replaced
    ]
    try:
        logits_q = models.quant(ids, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    logits_16 = models.twin(ids, use_cache=False).logits
    with _fp32_one_block_at_a_time(models.twin):
        logits_32 = models.twin(ids, use_cache=False).logits

    worst, worst_c = 0.0, 2.0
    for name, x, y in calls:
        layer = models.quant.get_submodule(name)
        c = get(layer.step).error_c
        worst_c = max(worst_c, c)
        w = models.twin.get_submodule(name).weight  # (N, K): the dequantized weight, exactly
        cols = np.sort(rng.choice(w.shape[0], size=min(CHECK_COLUMNS, w.shape[0]), replace=False))
        A = x.reshape(-1, x.shape[-1]).cpu().numpy()
        C = y.reshape(-1, y.shape[-1])[:, cols].float().cpu().numpy()
        worst = max(worst, error_excess(C, A, w[cols].T.cpu().numpy(), c))
    e_16 = _rel_err(logits_16, logits_32)
    return Check(worst, _rel_err(logits_q, logits_32), e_16, KAPPA * max(1.0, worst_c / 2) * e_16)


def format_check(check: Check) -> str:
    verdict = "ok" if check.passed else "FAIL"
    return (
        f"correctness ({verdict}): every MarlinLinear call within its rung's bound (max error/bound "
        f"{check.max_gemm_error_ratio:.3f} <= 1); logits vs FP32 twin: MarlinLinear {check.logits_rel_err:.2e}, "
        f"FP16 twin {check.fp16_logits_rel_err:.2e}, tolerance {check.logits_tolerance:.2e}"
    )

