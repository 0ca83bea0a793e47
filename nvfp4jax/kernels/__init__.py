"""CuTeDSL kernels (sm_90a), one op family per module, each with a thin JAX function.

Importing this package compiles nothing; each kernel compiles lazily at the first trace of its
JAX function (``cutlass.jax.cutlass_call``). Ops are reached through :mod:`nvfp4jax.ops`.
"""
