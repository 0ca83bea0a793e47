"""Nsight Compute view of one decode GEMM kernel, launched without JAX (GPU machine).

Nsight Compute segfaulted when attached to a JAX process on the GPU image, so this launches the
same CuTeDSL kernel class (``nvfp4jax.kernels.gemm.GemmNvfp4Sm90``) on torch tensors via DLPack.
Usage: ``ncu --profile-from-start off --launch-skip 2 --launch-count 1 [--set full] python
benchmarks/ncu_gemm.py [n k m split w4a4]`` (default: Flash ``wq_b`` at m = 1, W4A16, split 1;
the register-A path unless ``NVFP4JAX_GEMM_W_REGS=0``, as in ``choose_config``).
"""

from __future__ import annotations

import os
import sys

import cuda.bindings.driver as cuda
import cutlass.cute as cute
import torch
from cutlass.cute.runtime import from_dlpack

from nvfp4jax.kernels import gemm as kg


def main(n: int = 32768, k: int = 1024, m: int = 1, split: int = 1, act_nvfp4: bool = False) -> None:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = kg.GemmConfig(64, max(16, -(-m // 16) * 16), 128, split, act_nvfp4,
                        w_regs=os.environ.get(kg.W_REGS_ENV, "1") != "0")  # NVFP4JAX_GEMM_W_REGS=0: smem stages
    assert kg.GemmNvfp4Sm90.can_implement(cfg), cfg
    t = lambda a: from_dlpack(a, assumed_align=16)  # noqa: E731
    if act_nvfp4:
        xs = (t(torch.randint(0, 256, (m, k // 2), dtype=torch.uint8, device=dev)),
              t(torch.full((m, k // 16), 0x38, dtype=torch.uint8, device=dev)), t(torch.ones(m, device=dev)))
    else:
        xs = (t(torch.randn(m, k, device=dev).to(torch.bfloat16)), None, None)
    tiles = (n // 64, k // 128, 64)
    ws = (t(torch.randint(0, 256, (*tiles, 64), dtype=torch.uint8, device=dev)),
          t(torch.full((*tiles, 8), 0x38, dtype=torch.uint8, device=dev)), t(torch.ones(1, device=dev)))
    if split > 1:
        y = t(torch.empty(split, m, n, device=dev).permute(2, 1, 0))
    else:
        y = t(torch.empty(m, n, device=dev).to(torch.bfloat16).t())
    stream = cuda.CUstream(torch.cuda.current_stream().cuda_stream if dev == "cuda" else 0)
    args = (*xs, *ws, *kg._NO_GROUPS, y)
    compiled = cute.compile(kg.GemmNvfp4Sm90(cfg), stream, *args)
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.start()  # with ncu --profile-from-start off: only these launches
        for _ in range(5):
            compiled(stream, *args)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        print("ran", cfg)


if __name__ == "__main__":
    a = sys.argv[1:]
    main(*(int(v) for v in a[:4]), *(bool(int(v)) for v in a[4:5]))
