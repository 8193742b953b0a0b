"""Greedy decoding with a static KV cache, in a form a CUDA graph can capture and replay.

For each batch size both models get a static KV cache (transformers StaticCache) of
prompt + tokens positions, prefill a random prompt and decode greedily; the decode step
reads its token, position and 4-D attention mask from fixed buffers, so it can be captured.
steps.harness.timing.measure times that step (on a GPU it captures the step in a CUDA graph
and replays it; after each step the cache is rewound by one position so that every replay
decodes the same last position). With `compiled`, the decode step runs under
torch.compile(fullgraph=True): the MarlinLinear custom op has a fake implementation, so
there is no graph break, and inductor fuses the norms, rotary embedding, residual adds and
the SiLU gate that otherwise run as many small kernels. The prefill stays eager.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn
from transformers import StaticCache

from ...harness.timing import Timing, measure


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
