"""Pure-JAX reference of every kernel op: the CPU path and the test oracle.

Each module mirrors a kernel family in ``nvfp4jax/kernels/`` with the same function names and
signatures. Nothing here imports CuTeDSL.
"""
