"""The ladder inside PyTorch: `MarlinLinear` and its custom op (`layer`), its tensor-parallel
shards (`tp`), end-to-end decoding of a Llama-architecture model (`e2e`, one module per
section) and its decode-attention kernel."""
