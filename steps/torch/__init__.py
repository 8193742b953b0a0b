"""The ladder inside PyTorch: `MarlinLinear` and its custom op (`layer`), end-to-end
decoding of a Llama-architecture model (`e2e`) and its decode-attention kernel."""
