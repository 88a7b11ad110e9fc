"""numba kernels of the batched Llama runner on CPU, compiled on first use and cached on disk.

- attention: rotary embedding, the cache write and causal attention of a step's rows, each over its own
  sequence's cache.
- rows: RMSNorm, the residual add with the next norm, the MLP's gated activation, 8-bit rows for torch.
- matmul: rows times 4-bit and 8-bit weights by dot-product instructions, its tiles in tiles, written in LLVM IR
  with llvm's pieces.
- isa: which of them the CPU numba compiles for runs.
- cache: their compiled code for other CPUs (an image's build) and an image's prebuilt copy.
"""
