"""End-to-end decoding benchmark: a Llama-architecture decoder whose block linear layers are
MarlinLinear, against the same model in FP16, in tokens per second for greedy decoding.

One module per section, in the order a run goes through them:

- config       E2EConfig, the one object that says what a run measures; the Llama dimensions
- fusion       one q|k|v and one gate|up layer per block, grouped decode attention
- models       the MarlinLinear model and its dequantized FP16 twin (optionally tensor-parallel)
- correctness  every GEMM within its rung's bound, the logits within the FP16 twin's error
- decoding     greedy decoding with a static cache, captured and replayed as one step
- breakdown    a step's time split into linear layers, attention and the rest
- benchmark    the rows: both models at each batch size

torch and transformers are optional dependencies: import this package only where both are
installed (`python -m steps e2e` imports it lazily).
"""

from .benchmark import Row, format_table, run
from .config import DIMS, E2EConfig, llama_config
from .correctness import Check, check_logits, format_check
from .decoding import Decoder
from .fusion import attention_kind, fuse_projections, grouped_decode_attention
from .models import Models, block_linears, build_models, set_parameter_dtype

__all__ = [
    "DIMS", "Check", "Decoder", "E2EConfig", "Models", "Row", "attention_kind", "block_linears", "build_models",
    "check_logits", "format_check", "format_table", "fuse_projections", "grouped_decode_attention", "llama_config",
    "run", "set_parameter_dtype",
]  # fmt: skip
