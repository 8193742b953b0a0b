"""End-to-end decoding benchmark: a Llama-architecture decoder whose block linear layers are
MarlinLinear, against the same model in FP16, in tokens per second for greedy decoding.

The model is transformers' LlamaForCausalLM built from a LlamaConfig with random weights
(nothing is downloaded): Llama-2-7B or -70B dimensions with optionally fewer layers, or a
tiny configuration for CPU machines and tests. Every nn.Linear inside the decoder blocks
(q, k, v, o, gate, up, down) becomes a MarlinLinear; the embeddings, norms and lm_head
stay FP16. With `fused`, both models are first rebuilt with one q|k|v and one gate|up
layer per block (fuse_projections) whose decode-step attention reads each k/v head once
for its whole group of query heads (grouped_decode_attention; on a GPU a Triton decode
kernel, steps.torch.decode_attention), as serving engines run them. The FP16 model it is
compared with is its "dequantized twin": the same network whose replaced layers hold,
as ordinary FP16 weights, exactly the dequantized values the MarlinLinear multiplies by.
Both models therefore compute the same function and differ only in how the products are
rounded, which isolates the kernel.

Weights. Quantizing 6.5 billion random weights with the NumPy reference quantizer would
take minutes, and random weights need no quantizer: each block position draws WEIGHT_POOL
random QuantizedWeights (reference.random_quantized_weight, centered: mean zero and scaled
like a real layer, so that activations do not grow with depth) and layer i uses number
i % WEIGHT_POOL, in its own memory, so a decode step streams every layer's weights from
memory as with a real checkpoint.

Correctness, on one forward pass of a short prompt. A per-element bound for one GEMM,
reference.error_bound, holds for a product whose inputs are exact; in a network the inputs
of layer 2 already differ between the two models by layer 1's rounding, and every later
norm, softmax and residual add propagates and amplifies those differences by factors
(the network's sensitivity) that no per-GEMM bound knows. Two checks replace it:

1. Every MarlinLinear call in that forward pass, on the activations it actually received,
   meets its rung's bound c * u * (|A| @ |W|) against the dequantized weight (a subset of
   columns, as steps.harness.bench does). This is the kernel check, and it is rigorous.
2. The logits, relative to an FP32 evaluation of the twin (the same weights, fp16 -> fp32
   is exact): e_q = ||L_marlin - L_fp32|| / ||L_fp32|| must not exceed
   KAPPA * max(1, c / 2) * e_16, where e_16 is the same distance for the FP16 twin. To first
   order the logits' error is a sum over every rounding in the network of (sensitivity x
   local error); swapping the GEMMs changes only the GEMM terms, whose bound grows from
   c = 2 (fp32 accumulation, one rounding) to the rung's c, so the measured e_16 scaled by
   max(1, c / 2) estimates what the quantized model may show; KAPPA = 2 allows for these
   being random sums, not worst cases. A wrong layout, transpose or cache bug gives an
   error of order one, far above this.

Timing. For each batch size both models get a static KV cache (transformers StaticCache)
of prompt + tokens positions, prefill a random prompt and decode greedily; the decode step
reads its token, position and 4-D attention mask from fixed buffers, so it can be captured.
steps.harness.timing.measure times that step (on a GPU it captures the step in a CUDA graph and
replays it; after each step the cache is rewound by one position so that every replay
decodes the same last position). tokens/s = batch / step time.

With `compiled`, both models' decode step runs under torch.compile(fullgraph=True) (the
MarlinLinear custom op has a fake implementation, so there is no graph break): inductor
fuses the norms, rotary embedding, residual adds and the SiLU gate that otherwise run as
many small kernels, and the step is then captured and timed like the eager one. The
prefill, the correctness check and the breakdown below stay eager.

Breakdown (measured, then subtracted): "linear" is the sum over the replaced layers of one
call at the decode shape (batch x K), timed with measure per distinct (K, N) while rotating
over the model's own layers of that shape; "attention" is grouped_decode_attention over
the full static cache (query 1, keys max_cache_len, the boolean mask), timed per layer on
enough copies of a layer's K/V to stream them from memory, times the number of layers;
"rest" is the step minus both (norms, rotary, cache writes, lm_head, argmax, launch gaps,
and in unfused models transformers' copies of grouped k/v heads). Isolated
kernels can overlap or schedule differently in the step, so "rest" is an estimate.

torch and transformers are optional dependencies: import this module only where both are
installed (`python -m steps e2e` imports it lazily).
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

from reference import dequantize, error_excess, random_quantized_weight
from reference.sparse_marlin import prune_quantized_2_4

from ..harness.bench import CHECK_COLUMNS, Machine, copies_needed
from ..registry import get
from ..harness.timing import Timing, measure
from .layer import MarlinLinear

try:  # triton comes with GPU installs of torch; without it decode attention is SDPA's
    from . import decode_attention as triton_decode
except ImportError:
    triton_decode = None

# Llama-2 dimensions (the released configs); "tiny" is for CPU machines and tests.
DIMS = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=32000),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),  # grouped-query attention, as in 70B
}  # fmt: skip
WEIGHT_POOL = 2  # distinct random weights per block position, alternating over the layers
KAPPA = 2.0  # safety factor of the logits criterion (module docstring, check 2)
CHECK_BATCH = 2


def llama_config(dims: str, layers: int | None = None) -> LlamaConfig:
    """A LlamaConfig of the named dimensions, optionally with fewer (or more) layers."""
    if dims not in DIMS:
        raise ValueError(f"unknown --dims {dims!r}; use one of {', '.join(DIMS)}")
    sizes = dict(DIMS[dims])
    if layers is not None:
        if layers < 1:
            raise ValueError(f"--layers must be at least 1, got {layers}")
        sizes["num_hidden_layers"] = layers
    return LlamaConfig(**sizes, max_position_embeddings=4096, tie_word_embeddings=False)


# -- fused projections -------------------------------------------------------------------------------
# transformers' Llama multiplies the hidden states by q, k and v one after another, and
# by gate and up: five narrow GEMMs per block where serving engines launch two wide ones
# (one weight stream each). A narrow layer pays a kernel's fixed costs (launch, pipeline
# fill, reduction of shared slices) on few bytes, so `fused` rebuilds each block with
# one q|k|v layer and one gate|up layer, in both models alike.


class FusedQKVAttention(nn.Module):
    """A transformers LlamaAttention whose q, k and v come out of one linear layer.

    Everything after the projection is transformers' own code path (rotary embedding,
    cache update, the configured attention function), called with the original module,
    which keeps o_proj and the attributes the attention functions read. Not kept:
    transformers' recording of attention weights (output_attentions), which hooks
    LlamaAttention modules; decoding does not ask for it."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
        self.sizes = (q.out_features, k.out_features, v.out_features)
        self.qkv_proj = _concatenated(q, k, v)
        del attn.q_proj, attn.k_proj, attn.v_proj
        self.attn = attn

    def forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None, cache=None,
                **kwargs):  # fmt: skip
        cache = cache if cache is not None else past_key_values  # the argument's name up to transformers 5.2x
        attn = self.attn
        shape = (*hidden_states.shape[:-1], -1, attn.head_dim)
        q, k, v = [t.view(shape).transpose(1, 2) for t in self.qkv_proj(hidden_states).split(self.sizes, dim=-1)]
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, attn.layer_idx)
        if q.shape[2] == 1 and not self.training and _groupable(attention_mask, q, k):
            out, weights = grouped_decode_attention(q, k, v, attention_mask, attn.scaling), None
        else:
            attention = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
            dropout = attn.attention_dropout if self.training else 0.0
            out, weights = attention(attn, q, k, v, attention_mask, dropout=dropout, scaling=attn.scaling, **kwargs)
        return attn.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


def _groupable(mask, q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether grouped_decode_attention takes this mask: none, or 4-D (B or 1, 1 or H, 1, L)
    over exactly the cache's L positions (others go to transformers' attention)."""
    if mask is None:
        return True
    B, H = q.shape[:2]
    return mask.dim() == 4 and mask.shape[0] in (1, B) and mask.shape[1] in (1, H) and mask.shape[2] == 1 \
        and mask.shape[3] == k.shape[2]


def grouped_decode_attention(q, k, v, mask, scaling: float | None = None) -> torch.Tensor:
    """Attention of one new token: q (B, H, 1, D) over the cache k, v (B, Hkv, L, D), where
    each k/v head serves a group of G = H / Hkv query heads; returns (B, 1, H * D).

    The G query heads of a group become G query rows of one k/v head, so SDPA reads the cache
    once. transformers' SDPA path copies every k/v head G times first (repeat_kv) whenever
    it is given a mask (5.17) or, in versions that group one-token queries eagerly, still
    under torch.compile (5.24): a cost that grows with
    the batch and the cache and that serving engines do not pay (docs/results/e2e/profiles
    shows its kernels). A mask (B, 1 or H, 1, L) is shared by a query head's whole group.

    On a GPU with triton the grouped rows go to steps.torch.decode_attention, a decode kernel that
    reads the cache at close to the memory bandwidth; SDPA takes the rest (CPU, per-head
    masks, float masks)."""
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    grouped = q.reshape(B, Hkv, H // Hkv, D)
    if q.is_cuda and triton_decode is not None and triton_decode.supports(grouped, k, v, mask):
        scale = scaling if scaling is not None else D**-0.5
        return triton_decode.decode_attention(grouped, k, v, mask, scale).reshape(B, 1, H * D)
    if mask is not None and mask.shape[1] != 1:
        mask = mask.expand(B, H, 1, mask.shape[-1]).reshape(B, Hkv, H // Hkv, mask.shape[-1])
    out = F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask, scale=scaling)
    return out.reshape(B, 1, H * D)


def attention_kind(fused: bool, device: str) -> str:
    """What the decode steps' attention runs on: "transformers" (its SDPA path, unfused
    models), "triton" (grouped_decode_attention on steps.torch.decode_attention) or "grouped"
    (grouped_decode_attention on SDPA)."""
    if not fused:
        return "transformers"
    return "triton" if device == "cuda" and triton_decode is not None else "grouped"


class FusedGateUpMLP(nn.Module):
    """LlamaMLP with gate and up as one linear layer: down(act(gate(x)) * up(x))."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.intermediate_size = mlp.gate_proj.out_features
        self.gate_up_proj = _concatenated(mlp.gate_proj, mlp.up_proj)
        self.down_proj, self.act_fn = mlp.down_proj, mlp.act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


def _concatenated(*linears: nn.Linear) -> nn.Linear:
    """One nn.Linear whose outputs are those of `linears`, side by side."""
    first = linears[0]
    fused = nn.Linear(first.in_features, sum(m.out_features for m in linears), bias=first.bias is not None,
                      device=first.weight.device, dtype=first.weight.dtype)  # fmt: skip
    with torch.no_grad():
        fused.weight.copy_(torch.cat([m.weight for m in linears]))
        if first.bias is not None:
            fused.bias.copy_(torch.cat([m.bias for m in linears]))
    return fused.requires_grad_(first.weight.requires_grad)


def fuse_projections(model: nn.Module) -> None:
    """Give every decoder block of a LlamaForCausalLM one q|k|v and one gate|up layer, in place."""
    for block in model.model.layers:
        # New modules start in training mode; the fused ones take the mode of those they replace.
        block.self_attn = FusedQKVAttention(block.self_attn).train(block.self_attn.training)
        block.mlp = FusedGateUpMLP(block.mlp).train(block.mlp.training)


# -- the two models --------------------------------------------------------------------------------


@dataclass
class Models:
    twin: nn.Module  # FP16, replaced layers hold the dequantized weights
    quant: nn.Module  # the same network with MarlinLinear layers
    replaced: list[str]  # dotted names of the replaced layers
    rung: str


def block_linears(model: nn.Module) -> list[str]:
    """Dotted names of the nn.Linear layers inside the decoder blocks (not lm_head)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in f".{name}"]


def build_models(
    config: LlamaConfig,
    device: str,
    group_size: int = 128,
    rung: str | None = None,
    seed: int = 0,
    sparse: bool = False,
    fused: bool = False,
) -> Models:
    """The dequantized FP16 twin and the MarlinLinear model, random weights, on `device`;
    with `sparse`, the weights are pruned 2:4 (in both models) and the layers are sparse;
    with `fused`, both models' blocks have one q|k|v and one gate|up layer."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    with torch.device(device):
        twin = LlamaForCausalLM._from_config(config, dtype=torch.float16).eval().requires_grad_(False)
    if fused:
        fuse_projections(twin)
    names = block_linears(twin)
    # The copy's block linear layers are replaced below: give them weightless stand-ins instead
    # of copies, so that building never holds two FP16 models (70B dims: 1.7 GB a layer).
    stand_in = {id(twin.get_submodule(n).weight): nn.Parameter(torch.empty(0, device="meta"), False) for n in names}
    quant = copy.deepcopy(twin, memo=stand_in)
    pool: dict[str, list[tuple[MarlinLinear, torch.Tensor]]] = {}
    for name in names:
        position = name.split(".layers.", 1)[1].split(".", 1)[1]  # "self_attn.q_proj" (or "self_attn.qkv_proj")
        linear = twin.get_submodule(name)
        if position not in pool:
            pool[position] = []
            for _ in range(WEIGHT_POOL):
                qw = random_quantized_weight(rng, linear.in_features, linear.out_features, group_size, centered=True)
                if sparse:
                    qw = prune_quantized_2_4(qw)
                w_deq = torch.from_numpy(np.ascontiguousarray(dequantize(qw).T)).to(device)  # (N, K) like nn.Linear
                pool[position].append((MarlinLinear(qw, step=rung, device=device, sparse=sparse), w_deq))
        layer_index = int(name.split(".layers.", 1)[1].split(".", 1)[0])
        marlin, w_deq = pool[position][layer_index % WEIGHT_POOL]
        linear.weight.copy_(w_deq)
        parent, _, child = name.rpartition(".")
        setattr(quant.get_submodule(parent), child, copy.deepcopy(marlin))
    rungs = {quant.get_submodule(n).step for n in names}
    return Models(twin, quant, names, ", ".join(sorted(rungs)))


# -- correctness -------------------------------------------------------------------------------------


@dataclass
class Check:
    max_gemm_error_ratio: float  # max over every MarlinLinear call of error / rung bound (<= 1 passes)
    logits_rel_err: float  # e_q: MarlinLinear model vs FP32 twin
    fp16_logits_rel_err: float  # e_16: FP16 twin vs FP32 twin
    logits_tolerance: float  # KAPPA * max(1, c / 2) * e_16

    @property
    def passed(self) -> bool:
        return self.max_gemm_error_ratio <= 1.0 and self.logits_rel_err <= self.logits_tolerance


def _set_parameter_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Convert parameters only (model.to(dtype) would also round the fp32 rotary buffers)."""
    for p in model.parameters():
        p.data = p.data.to(dtype)


@contextmanager
def _fp32_one_block_at_a_time(model: nn.Module) -> Iterator[None]:
    """Evaluate an FP16 LlamaForCausalLM in FP32 while holding only one decoder block's
    weights in FP32 at a time (fp16 -> fp32 -> fp16 is exact): the whole model in FP32 would
    take twice its FP16 size beside it, which would halve the 70B layers that fit a GPU."""
    dtypes = {p: p.dtype for p in model.parameters()}
    hooks = []
    try:
        for block in model.model.layers:
            hooks.append(block.register_forward_pre_hook(lambda m, args: _set_parameter_dtype(m, torch.float32)))
            hooks.append(block.register_forward_hook(lambda m, args, out: _set_parameter_dtype(m, torch.float16)))
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
            lambda m, args, y, name=name: calls.append((name, args[0].detach(), y.detach()))
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


# -- decoding ----------------------------------------------------------------------------------------


def _cache_keyword(model: nn.Module) -> str:
    """transformers 5.17 calls the cache argument past_key_values, later versions cache."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class Decoder:
    """Greedy decoding of one model with a static KV cache.

    A decode step reads the current token, its position and a 4-D boolean attention mask
    from buffers that stay at the same addresses, and writes the next token back in place:
    a CUDA graph captured around `step` replays correctly. Passing the 4-D mask ourselves
    also bypasses transformers' mask construction, which differs between versions.
    """

    def __init__(self, model: nn.Module, batch: int, max_len: int, compiled: bool = False):
        self.model, self.batch, self.max_len = model, batch, max_len
        self.forward = model.forward
        if compiled:
            # One graph per (model, batch): start from empty dynamo caches so earlier batch
            # sizes do not count against its recompilation limit.
            torch._dynamo.reset()
            self.forward = torch.compile(model.forward, fullgraph=True)
        device = model.device
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.cache_keyword = _cache_keyword(model)
        self.token = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.position = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.mask = torch.zeros((batch, 1, 1, max_len), dtype=torch.bool, device=device)
        self.length = 0  # positions written to the cache

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, eager: bool = False) -> torch.Tensor:
        kwargs = {self.cache_keyword: self.cache}
        forward = self.model.forward if eager else self.forward
        out = forward(ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **kwargs)
        return out.logits[:, -1:].argmax(-1)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Prefill `prompt` (batch x P) and decode greedily; returns the new_tokens tokens."""
        P = prompt.shape[1]
        if P + new_tokens > self.max_len:
            raise ValueError(f"prompt {P} + {new_tokens} tokens do not fit a cache of {self.max_len} positions")
        causal = torch.ones((P, self.max_len), dtype=torch.bool, device=prompt.device).tril()
        positions = torch.arange(P, device=prompt.device).expand(self.batch, P)
        # Prefill runs eagerly: only the decode step is timed, and compiling a second (prompt-length)
        # graph per model and batch would double the compile time for nothing measured.
        self.token.copy_(self._forward(prompt, causal.expand(self.batch, 1, P, self.max_len), positions, eager=True))
        self.mask[..., :P] = True
        self.length = P
        out = [self.token.clone()]
        for _ in range(new_tokens - 1):
            self._advance()
            self.step()
            self.length += 1
            out.append(self.token.clone())
        return torch.cat(out, dim=1)

    def _advance(self) -> None:
        """Point the buffers at the next position (outside any captured graph)."""
        self.position.fill_(self.length)
        self.mask[..., self.length] = True

    def step(self) -> None:
        """One decode step from the buffers: the next token replaces the current one."""
        self.token.copy_(self._forward(self.token, self.mask, self.position))

    def last_position_step(self) -> Callable[[int], None]:
        """After generate: a launch(i) that decodes the cache's last position and rewinds the
        cache, so that it can be called (or captured and replayed) any number of times."""
        if self.length != self.max_len - 1:
            raise ValueError("the repeated step decodes the cache's last position: generate max_len - 1 positions first")
        self._advance()
        lengths = [layer.cumulative_length for layer in self.cache.layers]

        @torch.no_grad()
        def launch(i: int) -> None:
            self.step()
            torch._foreach_sub_(lengths, 1)  # rewind, one kernel: the next replay writes the same position again

        return launch

    def time_step(self, device: str) -> Timing:
        """Median time of one decode step at the cache's last position (after generate)."""
        return measure(self.last_position_step(), device=device)


# -- breakdown ---------------------------------------------------------------------------------------


@torch.no_grad()
def linear_us(model: nn.Module, names: list[str], batch: int, device: str) -> float:
    """Sum over the named layers of one call at (batch, K): timed per (K, N), rotating over the layers."""
    by_shape: dict[tuple[int, int], list[nn.Module]] = {}
    for name in names:
        m = model.get_submodule(name)
        by_shape.setdefault((m.in_features, m.out_features), []).append(m)
    total = 0.0
    for (K, _), layers in by_shape.items():
        x = torch.randn((batch, K), dtype=torch.float16, device=device)
        total += measure(lambda i: layers[i](x), len(layers), device).median_us * len(layers)
    return total


@torch.no_grad()
def attention_us(config: LlamaConfig, machine: Machine, batch: int, max_len: int) -> float:
    """SDPA over a full static cache of max_len positions, per layer, times the number of layers."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    device = machine.device
    q = torch.randn((batch, heads, 1, head_dim), dtype=torch.float16, device=device)
    mask = torch.ones((batch, 1, 1, max_len), dtype=torch.bool, device=device)
    kv_bytes = 2 * batch * kv_heads * max_len * head_dim * 2
    copies = min(config.num_hidden_layers, copies_needed(kv_bytes, machine))
    kv = [torch.randn((2, batch, kv_heads, max_len, head_dim), dtype=torch.float16, device=device) for _ in range(copies)]
    t = measure(lambda i: grouped_decode_attention(q, kv[i][0], kv[i][1], mask), copies, device)
    return t.median_us * config.num_hidden_layers


# -- the benchmark -----------------------------------------------------------------------------------


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
    model: str  # "fp16" or the rung(s) of the MarlinLinear layers
    step_us: float
    q1_us: float
    q3_us: float
    method: str
    tokens_per_s: float
    speedup_vs_fp16: float
    linear_us: float
    attention_us: float
    rest_us: float
    greedy_agreement: float  # share of generated tokens equal to the FP16 twin's
    max_gemm_error_ratio: float
    logits_rel_err: float
    fp16_logits_rel_err: float
    logits_tolerance: float


def run(
    machine: Machine,
    dims: str,
    layers: int | None,
    batches: tuple[int, ...],
    new_tokens: int,
    prompt_len: int,
    group_size: int = 128,
    rung: str | None = None,
    seed: int = 0,
    sparse: bool = False,
    compiled: bool = False,
    fused: bool = False,
    on_batch: Callable[[list[Row]], None] | None = None,
) -> tuple[Check, list[Row]]:
    """Build both models, check them, and time decoding at each batch size (no rows if the check fails).

    `on_batch` receives each batch size's rows as soon as they are measured, so that a run
    stopped by a time limit keeps the batches it finished."""
    if machine.device == "cpu" and dims != "tiny":
        raise ValueError(f"--dims {dims} needs a GPU (its FP16 weights alone are many GB); use --dims tiny on a CPU")
    if new_tokens < 1 or prompt_len < 1 or min(batches) < 1:
        raise ValueError("--tokens, --prompt-len and every --batch must be at least 1")
    config = llama_config(dims, layers)
    models = build_models(config, machine.device, group_size, rung, seed, sparse, fused)
    check = check_logits(models, prompt_len, seed)
    if not check.passed:
        return check, []
    max_len = prompt_len + new_tokens
    rng = np.random.default_rng(seed + 1)
    rows: list[Row] = []
    for batch in batches:
        batch_rows = []
        prompt = torch.from_numpy(rng.integers(0, config.vocab_size, (batch, prompt_len))).to(machine.device)
        timed = {}
        for label, model in (("fp16", models.twin), (models.rung, models.quant)):
            decoder = Decoder(model, batch, max_len, compiled)
            tokens = decoder.generate(prompt, new_tokens)
            timed[label] = (decoder.time_step(machine.device), tokens)
            del decoder
            if machine.device == "cuda":
                torch.cuda.empty_cache()
        attn = attention_us(config, machine, batch, max_len)
        base_t, base_tokens = timed["fp16"]
        for label, model in (("fp16", models.twin), (models.rung, models.quant)):
            t, tokens = timed[label]
            lin = linear_us(model, models.replaced, batch, machine.device)
            batch_rows.append(Row(
                "e2e", dims, config.num_hidden_layers, batch, prompt_len, new_tokens, max_len, group_size, sparse, compiled,
                fused, attention_kind(fused, machine.device), label,
                t.median_us, t.q1_us, t.q3_us, t.method, batch / (t.median_us * 1e-6),
                base_t.median_us / t.median_us, lin, attn, t.median_us - lin - attn,
                float((tokens == base_tokens).float().mean()), check.max_gemm_error_ratio, check.logits_rel_err,
                check.fp16_logits_rel_err, check.logits_tolerance,
            ))  # fmt: skip
        rows += batch_rows
        if on_batch is not None:
            on_batch(batch_rows)
    return check, rows


def format_check(check: Check) -> str:
    verdict = "ok" if check.passed else "FAIL"
    return (
        f"correctness ({verdict}): every MarlinLinear call within its rung's bound (max error/bound "
        f"{check.max_gemm_error_ratio:.3f} <= 1); logits vs FP32 twin: MarlinLinear {check.logits_rel_err:.2e}, "
        f"FP16 twin {check.fp16_logits_rel_err:.2e}, tolerance {check.logits_tolerance:.2e}"
    )


def format_table(rows: list[Row], machine: Machine) -> str:
    first = rows[0]
    head = (
        f"{machine.name} ({machine.device}); Llama {first.dims} dims, {first.layers} layers, prompt {first.prompt_len}, "
        f"{first.new_tokens} new tokens, static cache {first.max_cache_len}, group size {first.group_size}"
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
