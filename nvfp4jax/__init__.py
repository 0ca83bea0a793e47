"""nvfp4jax: DeepSeek-V4 inference in JAX with NVFP4."""
