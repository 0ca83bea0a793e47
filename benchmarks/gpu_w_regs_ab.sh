#!/usr/bin/env bash
# GPU check and A/B of the opt-in register-A GEMM path (GemmConfig.w_regs, $NVFP4JAX_GEMM_W_REGS=1):
# its GPU tests first (the GEMM and MoE w_regs cases, then the quick W4A4/W4A16 set with the path on),
# then a decode-config sweep with and without it, Nsight Compute on Flash wq_b m=1 with it, and the
# quick MoE benchmark with it (compare with the session-4 table in RESULTS.md). Every log
# in OUTDIR; each stage under its own limit, so a run cut short still leaves what it measured.
# Usage: bash benchmarks/gpu_w_regs_ab.sh OUTDIR [tests|bench|all]   (tests ~6 min, bench ~12 min:
# two calls of the device tool, whose commands stop at 10 minutes)
set -u
out=${1:?usage: gpu_w_regs_ab.sh OUTDIR [tests|bench|all]}
what=${2:-all}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$out/gpu.txt"
P="python3 -m pytest -o addopts= -q -m gpu -p no:warnings --tb=short -rf"
if [ "$what" != bench ]; then
XLA_FLAGS=--xla_gpu_autotune_level=0 timeout 150 $P tests/kernels/test_gemm.py tests/kernels/test_moe.py -k w_regs \
  > "$out/w_regs_tests.log" 2>&1
echo "w_regs tests: $(tail -1 "$out/w_regs_tests.log")"
NVFP4JAX_GEMM_W_REGS=1 XLA_FLAGS=--xla_gpu_autotune_level=0 NVFP4JAX_GPU_TESTS=quick timeout 200 \
  $P -x tests/kernels/test_gemm.py -k "w4a4 or w4a16 or small" > "$out/quick_gemm_w_regs.log" 2>&1
echo "quick GEMM tests with w_regs: $(tail -1 "$out/quick_gemm_w_regs.log")"
fi
[ "$what" = tests ] && exit 0
timeout 300 python3 benchmarks/gemm_tune.py --names wq_b,wo_b,shared.w1/w3 --m 1,16 --tile-w 64 \
  --recipes w4a16 --splits 1,4,8 --prefetch 1,2 --w-regs 0,1 --budget-s 260 > "$out/tune.log" 2>&1
cat "$out/tune.log"
NVFP4JAX_GEMM_W_REGS=1 timeout 120 ncu --profile-from-start off --launch-skip 2 --launch-count 1 --set full \
  python3 benchmarks/ncu_gemm.py > "$out/ncu_w_regs.log" 2>&1
grep -E "Duration|Registers Per|Achieved Occupancy|L1/TEX Hit|Memory Throughput|DRAM Throughput" "$out/ncu_w_regs.log" | head -12
NVFP4JAX_GEMM_W_REGS=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 300 python3 benchmarks/moe.py --quick \
  --budget-s 200 > "$out/moe_w_regs.log" 2>&1
grep -E "^\|" "$out/moe_w_regs.log"
