"""The ladder inside PyTorch: `MarlinLinear` and its custom op (`layer`), its tensor-parallel
shards (`tp`), GPTQ / AWQ checkpoint directories loaded into transformers models
(`checkpoint`, also `steps.torch.load_quantized`), greedy decoding from them (`generate`),
end-to-end decoding of a Llama-architecture model (`e2e`, one module per section) and its
decode-attention kernel."""


def __getattr__(name: str):
    # load_quantized needs transformers and safetensors: imported on first use only.
    if name == "load_quantized":
        from .checkpoint import load_quantized

        return load_quantized
    raise AttributeError(f"module 'steps.torch' has no attribute {name!r}")
