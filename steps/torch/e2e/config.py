"""What one end-to-end run measures, in one object: the model's dimensions, the decoding
lengths and batch sizes, the weights' quantization and the ways of running the model
(sparse, fused, compiled, tensor-parallel). Every function of the benchmark takes this
E2EConfig instead of a long list of parameters; `python -m steps e2e` fills it from its
options and every JSON row repeats its fields.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import LlamaConfig

# Llama-2 dimensions (the released configs); "tiny" is for CPU machines and tests.
DIMS = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=32000),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),  # grouped-query attention, as in 70B
}  # fmt: skip


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


@dataclass(frozen=True)
class E2EConfig:
    dims: str = "tiny"  # a key of DIMS
    layers: int | None = None  # decoder layers (None: the model's own)
    batches: tuple[int, ...] = (1, 2)
    new_tokens: int = 32  # tokens decoded per sequence
    prompt_len: int = 32
    group_size: int = 128
    rung: str | None = None  # force this rung for the MarlinLinear layers (None: the fastest that runs)
    seed: int = 0
    sparse: bool = False  # weights pruned 2:4 (in the FP16 twin too), sparse layers
    compiled: bool = False  # both models' decode step under torch.compile(fullgraph=True)
    fused: bool = False  # q|k|v and gate|up as one layer each, grouped decode attention (both models)
    tp: int = 1  # tensor-parallel ranks (steps.torch.tp); this process holds one rank's shard

    def llama(self) -> LlamaConfig:
        """The whole (unsharded) model's LlamaConfig."""
        return llama_config(self.dims, self.layers)

    def validate(self, device: str) -> None:
        """One-sentence errors for settings this device cannot run."""
        if device == "cpu" and self.dims != "tiny":
            raise ValueError(f"--dims {self.dims} needs a GPU (its FP16 weights alone are many GB); use --dims tiny on a CPU")
        if self.new_tokens < 1 or self.prompt_len < 1 or not self.batches or min(self.batches) < 1:
            raise ValueError("--tokens, --prompt-len and every --batch must be at least 1")
        if self.tp < 1:
            raise ValueError(f"--tp must be at least 1, got {self.tp}")
        self.llama()  # unknown dims or layers
