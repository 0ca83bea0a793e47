"""Nsight Compute view of one GEMM kernel, launched without JAX (GPU machine).

Nsight Compute segfaulted when attached to a JAX process on the GPU image, so this launches the
same CuTeDSL kernel classes on torch tensors via DLPack.
Usage: ``ncu --profile-from-start off --launch-skip 2 --launch-count 1 [--set full] python
benchmarks/ncu_gemm.py [n k m split w4a4]``: the decode kernel (``gemm.GemmNvfp4Sm90``; default Flash
``wq_b`` at m = 1, W4A16, split 1; the register-A path unless ``NVFP4JAX_GEMM_W_REGS=0``, as in
``choose_config``); ``... ncu_gemm.py ws [n k m w4a4]``: the warp-specialized prefill kernel
(``gemm_ws.GemmPrefillSm90`` with ``choose_prefill_config``'s tile, W by TMA unless
``NVFP4JAX_GEMM_WS_W=regs``; default Flash ``wq_a`` at m = 16384, W4A16): whether its tensor pipe or its
producer sets the pace. On a machine without a GPU either one is only compiled.
"""

from __future__ import annotations

import os
import sys

import cuda.bindings.driver as cuda
import cutlass.cute as cute
import torch
from cutlass.cute.runtime import from_dlpack

from nvfp4jax.kernels import gemm as kg, gemm_ws as kw


def _weight(n: int, k: int, dev: str, t) -> tuple:
    """A tiled NVFP4 weight [n, k] as the kernels take it: codes, scale bytes (0x38: 1.0), global scale."""
    tiles = (n // 64, k // 128, 64)
    return (t(torch.randint(0, 256, (*tiles, 64), dtype=torch.uint8, device=dev)),
            t(torch.full((*tiles, 8), 0x38, dtype=torch.uint8, device=dev)), t(torch.ones(1, device=dev)))


def _launch(kernel, args, dev: str, what) -> None:
    """Compile ``kernel`` for ``args``; on a GPU run it 5 times between profiler start and stop (with ncu
    ``--profile-from-start off``: only these launches)."""
    stream = cuda.CUstream(torch.cuda.current_stream().cuda_stream if dev == "cuda" else 0)
    compiled = cute.compile(kernel, stream, *args)
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        for _ in range(5):
            compiled(stream, *args)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        print("ran", what)
    else:
        print("compiled (no GPU)", what)


def main_ws(n: int = 1024, k: int = 4096, m: int = 16384, act_nvfp4: bool = False) -> None:
    """The prefill kernel: X BF16 [m, k] (recipe nvfp4: X as ``dequant_rows`` writes it, with per-row
    global scales), Y BF16 [m, n]."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = kw.choose_prefill_config(m, n, act_nvfp4)
    t = lambda a: from_dlpack(a, assumed_align=16)  # noqa: E731
    x = t(torch.randn(m, k, device=dev).to(torch.bfloat16))
    gx = t(torch.ones(m, device=dev)) if act_nvfp4 else None
    y = t(torch.empty(m, n, device=dev).to(torch.bfloat16))
    _launch(kw.kernel_for(cfg), (x, gx, *_weight(n, k, dev, t), *kw._NO_GROUPS, y), dev, cfg)


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
    ws = _weight(n, k, dev, t)
    if split > 1:
        y = t(torch.empty(split, m, n, device=dev).permute(2, 1, 0))
    else:
        y = t(torch.empty(m, n, device=dev).to(torch.bfloat16).t())
    _launch(kg.GemmNvfp4Sm90(cfg), (*xs, *ws, *kg._NO_GROUPS, y), dev, cfg)


if __name__ == "__main__":
    a = sys.argv[1:]
    if a[:1] == ["ws"]:
        main_ws(*(int(v) for v in a[1:4]), *(bool(int(v)) for v in a[4:5]))
    else:
        main(*(int(v) for v in a[:4]), *(bool(int(v)) for v in a[4:5]))
