"""Any K and N on every rung: weights padded once at pack time, activations only when needed.

Each rung's layout needs K and N to be multiples of something (eight codes per int32 word,
16-byte vector loads, one warp per 64 columns, a pipeline tile); the rung lists the
(K, N) multiples it can run for every batch size as `Step.shape_multiples`. A weight of
another shape is padded once, in `pack`, to the smallest shape of those multiples (and of
its group size), with padding that dequantizes to exactly 0: padded codes equal their
zero point and padded groups get scale 1. A product then pads the activations along K
with zeros only when K itself is unaligned, and writes through a wider output buffer,
sliced, only when N is: aligned shapes take the same path as before and pay nothing.

The padding is exact. A padded row of K contributes 0 * a_k = 0 to every dot product
(activations padded with zeros, weights that dequantize to 0) and padded columns of N are
cut off, so the result is the unpadded product, bit for bit, on every rung whose order of
summation does not depend on K (and within the error bound on all of them).
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace
from typing import Any

import numpy as np

from reference import QuantizedWeight
from reference.quant import SYMMETRIC_ZERO

from ._arrays import array_kind, empty_like_kind


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


@functools.lru_cache(maxsize=4096)
def padded_shape(multiples: tuple[tuple[int, int], ...], K: int, N: int, group_size: int) -> tuple[int, int]:
    """The smallest (K', N') >= (K, N), by area, that is a multiple of one of `multiples`,
    with K' also a multiple of the group size (padding adds whole groups)."""
    group_rows = 1 if group_size == -1 else group_size
    shapes = [(round_up(K, math.lcm(mk, group_rows)), round_up(N, mn)) for mk, mn in multiples]
    return min(shapes, key=lambda s: (s[0] * s[1], s))


def pad_weight(qw: QuantizedWeight, K: int, N: int) -> QuantizedWeight:
    """qw padded to K x N rows and columns, the padding dequantizing to exactly 0."""
    if (K, N) == (qw.K, qw.N):
        return qw
    groups = 1 if qw.group_size == -1 else K // qw.group_size
    zeros = qw.zeros_or_default()
    padded_zeros = np.full((groups, N), SYMMETRIC_ZERO, dtype=np.uint8)
    padded_zeros[: zeros.shape[0], : qw.N] = zeros
    # Every padded code is its group's zero point: (q - z) = 0 whatever the scale.
    codes = np.repeat(padded_zeros, K if qw.group_size == -1 else qw.group_size, axis=0)
    codes[: qw.K, : qw.N] = qw.codes
    scales = np.ones((groups, N), dtype=qw.dtype)
    scales[: qw.scales.shape[0], : qw.N] = qw.scales
    return QuantizedWeight(codes, scales, qw.group_size, None if qw.zeros is None else padded_zeros)


def run_padded(step: Any, A: Any, packed: Any, out: Any, K: int, N: int) -> None:
    """step._run on activations padded to K columns and an output of N columns, where they differ."""
    M = A.shape[0]
    dtype = str(A.dtype).removeprefix("torch.")
    if K != packed.K:
        wide = empty_like_kind(A, (M, K), dtype)
        wide[:, : packed.K] = A
        wide[:, packed.K :] = 0
        A = wide
    target = out if N == packed.N else empty_like_kind(A, (M, N), dtype)
    step._run(A, replace(packed, K=K, N=N), target)
    if target is not out:
        if array_kind(out) == "torch":
            out.copy_(target[:, : packed.N])
        else:
            out[...] = target[:, : packed.N]
