"""Memory and speed: CUDA setup and the budget, fp8/NF4 storage, checkpointing, block swapping, compile and graphs."""
