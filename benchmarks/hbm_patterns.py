"""HBM read bandwidth of the decode GEMM's weight access pattern vs. alternatives (GPU, CUDA C via CuPy).

A diagnostic, not a product path: it asks whether the ~1.1 TB/s at which the decode GEMM streams
NVFP4 weights is set by *how* it addresses them. Every kernel here only loads and XORs (no decode,
no shared memory, no wgmma), over the Flash ``wq_b`` weight (32768 x 1024 NVFP4: 16.8 MB of codes,
2.1 MB of E4M3 scales), with the GEMM's grid (64 weight rows x 128 threads per CTA):

* ``rowmajor``: the GEMM's pattern today -- the checkpoint's row-major ``[n, k/2]`` codes; per K tile
  a thread loads 16 B of one row (4 threads per row, 32 rows per pass, 2 passes) and the 2 B of
  that chunk's scales (``[n, k/16]``); consecutive K tiles move 64 B along the rows.
* ``rowmajor-noscale``: the same without the scale loads.
* ``tiled``: the same bytes pre-arranged so that one CTA's K tile (64 rows x 64 B of codes, then
  its 64 x 8 B of scales) is contiguous: a warp's 16-byte loads cover 512 contiguous bytes.
* ``rowmajor-grouped``: row-major, but a thread loads the scales of 8 K tiles at once (16 B; a row's
  4 threads cover its 64 B) and each tile's 2 B reach the thread that needs them by 2 warp shuffles.
* ``stream``: a plain grid-stride read of both buffers (the read ceiling).

``P`` = K tiles of loads in flight per thread (1, 2, 4); ``CTAs/SM`` is forced with dynamic shared
memory (the GEMM's 40 KB -> 5 per SM). Times are CUDA-event medians of single launches, each after a
256 MiB write that evicts L2. Run on the GPU machine: ``python benchmarks/hbm_patterns.py``.
"""

from __future__ import annotations

import statistics
import sys

import cupy as cp

SHAPES = ((32768, 1024), (4096, 8192))  # Flash wq_b, wo_b
ROWS_PER_CTA, THREADS, TILE_K = 64, 128, 128

SRC = r"""
typedef unsigned short uint16_t;
template <int P, int LAYOUT, int SCALES>
__device__ void run(const uint4* __restrict__ v, const uint16_t* __restrict__ s, unsigned* out,
                    int k_tiles_cta, int k_tiles, int row_bytes) {
  const int t = threadIdx.x, cta = blockIdx.x, kt0 = blockIdx.z * k_tiles_cta;
  unsigned acc = 0;
  for (int i0 = 0; i0 < k_tiles_cta; i0 += P) {
    uint4 r[P][2];
    uint16_t q[P][2];
#pragma unroll
    for (int j = 0; j < P; ++j) {
      int kt = kt0 + i0 + j;
#pragma unroll
      for (int p = 0; p < 2; ++p) {
        int row = cta * 64 + t / 4 + 32 * p;
        unsigned long long vi, si;
        if (LAYOUT == 0) {  // row-major [n, k/2]; 16-byte units
          vi = ((unsigned long long)row * row_bytes + kt * 64 + (t % 4) * 16) / 16;
          si = ((unsigned long long)row * (row_bytes / 8) + kt * 8 + (t % 4) * 2) / 2;
        } else {  // tiled: [n/64, k_tiles, 64 rows x 64 B] codes, [n/64, k_tiles, 64 x 8 B] scales
          unsigned long long tile = (unsigned long long)cta * k_tiles + kt;
          vi = tile * 256 + p * 128 + t;
          si = tile * 256 + p * 128 + t;
        }
        r[j][p] = v[vi];
        if (SCALES) q[j][p] = s[si];
      }
    }
#pragma unroll
    for (int j = 0; j < P; ++j)
#pragma unroll
      for (int p = 0; p < 2; ++p) acc ^= r[j][p].x ^ r[j][p].y ^ r[j][p].z ^ r[j][p].w ^ (SCALES ? q[j][p] : 0);
  }
  if (acc == 0x9e3779b9u) out[0] = acc;
}

// row-major, scales of 8 K tiles loaded at once (16 B per thread, a row's 4 threads cover its 64 B)
// and handed to the thread that decodes each chunk with two warp shuffles per tile and pass
template <int P>
__device__ void run_grouped(const uint4* __restrict__ v, const uint4* __restrict__ s, unsigned* out,
                            int k_tiles_cta, int row_bytes) {
  const int t = threadIdx.x, cta = blockIdx.x, kt0 = blockIdx.z * k_tiles_cta, part = t % 4, lane = t % 32;
  unsigned acc = 0;
  for (int g0 = 0; g0 < k_tiles_cta; g0 += 8) {
    uint4 grp[2];
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      int row = cta * 64 + t / 4 + 32 * p;
      grp[p] = s[((unsigned long long)row * (row_bytes / 8) + (kt0 + g0) * 8 + part * 16) / 16];
    }
#pragma unroll
    for (int i0 = 0; i0 < 8; i0 += P) {
      uint4 r[P][2];
#pragma unroll
      for (int j = 0; j < P; ++j)
#pragma unroll
        for (int p = 0; p < 2; ++p) {
          int row = cta * 64 + t / 4 + 32 * p, kt = kt0 + g0 + i0 + j;
          r[j][p] = v[((unsigned long long)row * row_bytes + kt * 64 + part * 16) / 16];
        }
#pragma unroll
      for (int j = 0; j < P; ++j) {
        int i = i0 + j, src = (lane & ~3) | (i / 2);
#pragma unroll
        for (int p = 0; p < 2; ++p) {
          unsigned w0 = __shfl_sync(0xffffffffu, (i % 2) ? grp[p].z : grp[p].x, src);
          unsigned w1 = __shfl_sync(0xffffffffu, (i % 2) ? grp[p].w : grp[p].y, src);
          unsigned w = (part / 2) ? w1 : w0;
          acc ^= r[j][p].x ^ r[j][p].y ^ r[j][p].z ^ r[j][p].w ^ ((w >> (16 * (part % 2))) & 0xffffu);
        }
      }
    }
  }
  if (acc == 0x9e3779b9u) out[0] = acc;
}
extern "C" __global__ void __launch_bounds__(128) grp_1(const uint4* v, const uint4* s, unsigned* out, int a, int b, int c) { run_grouped<1>(v, s, out, a, c); }
extern "C" __global__ void __launch_bounds__(128) grp_2(const uint4* v, const uint4* s, unsigned* out, int a, int b, int c) { run_grouped<2>(v, s, out, a, c); }
extern "C" __global__ void __launch_bounds__(128) grp_4(const uint4* v, const uint4* s, unsigned* out, int a, int b, int c) { run_grouped<4>(v, s, out, a, c); }

#define DEF(P, L, S) extern "C" __global__ void __launch_bounds__(128) pat_##P##_##L##_##S( \
  const uint4* v, const uint16_t* s, unsigned* out, int a, int b, int c) { run<P, L, S>(v, s, out, a, b, c); }
DEF(1,0,1) DEF(2,0,1) DEF(4,0,1) DEF(1,0,0) DEF(2,0,0) DEF(4,0,0) DEF(1,1,1) DEF(2,1,1) DEF(4,1,1)

extern "C" __global__ void stream(const uint4* v, unsigned long long n16, unsigned* out) {
  unsigned acc = 0;
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n16; i += (unsigned long long)gridDim.x * blockDim.x * 4) {
    uint4 a = v[i], b = i + gridDim.x * blockDim.x < n16 ? v[i + gridDim.x * blockDim.x] : a;
    unsigned long long i2 = i + 2 * (unsigned long long)gridDim.x * blockDim.x, i3 = i + 3 * (unsigned long long)gridDim.x * blockDim.x;
    uint4 c = i2 < n16 ? v[i2] : a, d = i3 < n16 ? v[i3] : a;
    acc ^= a.x ^ b.y ^ c.z ^ d.w;
  }
  if (acc == 0x9e3779b9u) out[0] = acc;
}
"""


def timed(launch, flush, reps=15):
    ts = []
    for _ in range(reps):
        flush.fill(1)
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        launch()
        b.record()
        b.synchronize()
        ts.append(cp.cuda.get_elapsed_time(a, b) * 1e-3)
    return statistics.median(ts)


def main() -> None:
    mod = cp.RawModule(code=SRC, options=("-std=c++17",))
    dev = cp.cuda.Device()
    name = cp.cuda.runtime.getDeviceProperties(dev.id)["name"].decode()
    sms = dev.attributes["MultiProcessorCount"]
    out = cp.zeros(4, cp.uint32)
    flush = cp.zeros(256 << 20, cp.uint8)
    for n, k in SHAPES:
        shape(mod, name, sms, n, k, out, flush)


def shape(mod, name, sms, N, K, out, flush) -> None:
    CODES, SCALES = N * K // 2, N * K // 16
    v = cp.random.randint(0, 2**31, size=CODES // 4, dtype=cp.uint32)
    s = cp.random.randint(0, 2**16, size=SCALES // 2, dtype=cp.uint16)
    total = CODES + SCALES
    print(f"{name}, {sms} SMs; n={N} k={K}: {CODES / 1e6:.1f} MB codes + {SCALES / 1e6:.1f} MB scales")
    k_tiles = K // TILE_K
    stream = mod.get_function("stream")
    for ctas in (sms * 4, sms * 16):
        t = timed(lambda: stream((ctas,), (256,), (v, cp.uint64(CODES // 16), out)), flush)
        print(f"  stream (codes only), {ctas} CTAs x 256: {t * 1e6:7.1f} us  {CODES / t / 1e12:.2f} TB/s")
    print(f"  {'pattern':18s} {'P':>2s} {'split':>5s} {'CTAs/SM':>7s} {'us':>7s} {'TB/s':>6s}")
    for layout, scales, label in ((0, 1, "rowmajor"), (0, 0, "rowmajor-noscale"), (1, 1, "tiled"),
                                  (2, 1, "rowmajor-grouped")):
        for p in (1, 2, 4):
            f = mod.get_function(f"grp_{p}" if layout == 2 else f"pat_{p}_{layout}_{scales}")
            for split in (1, 2, 4, 8):
                kc = k_tiles // split
                if kc % p or (layout == 2 and kc % 8):
                    continue
                for smem in (40 * 1024, 0):
                    grid = (N // ROWS_PER_CTA, 1, split)
                    t = timed(lambda: f(grid, (THREADS,), (v, s, out, kc, k_tiles, K // 2), shared_mem=smem), flush)
                    nbytes = total if scales else CODES
                    occ = "5 (40K)" if smem else "max"
                    print(f"  {label:18s} {p:2d} {split:5d} {occ:>7s} {t * 1e6:7.1f} {nbytes / t / 1e12:6.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
