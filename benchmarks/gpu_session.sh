#!/usr/bin/env bash
# One GPU session: quick kernel tests, then the GEMM and MoE benchmarks, every log in OUTDIR.
# Usage: bash benchmarks/gpu_session.sh OUTDIR [TEST_SECONDS] [BENCH_SECONDS]
# Each stage runs under its own time limit and writes as it goes, so a session cut short by a
# device-time limit still leaves its logs (the benchmarks print each table row when measured).
set -u
out=${1:?usage: gpu_session.sh OUTDIR [TEST_SECONDS] [BENCH_SECONDS]}
tests_s=${2:-300}
bench_s=${3:-240}
mkdir -p "$out"
export NVFP4JAX_COMMIT=${NVFP4JAX_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
# -o addopts= drops the CPU-side jaxtyping/beartype hooks (beartype may be missing on the GPU image)
# XLA's GEMM autotuning dominated the tests' time (the references compile many shapes); the tests
# compare values, not speed, so it is off here (the benchmarks keep it on for their baselines)
XLA_FLAGS=--xla_gpu_autotune_level=0 NVFP4JAX_GPU_TESTS=quick timeout "$tests_s" python3 -m pytest -o addopts= -q -m gpu -p no:warnings --tb=short -rf \
  tests/kernels tests/model/test_kernel_model.py > "$out/gpu_tests.log" 2>&1
grep -E "^FAILED|passed|failed" "$out/gpu_tests.log" | tail -20
timeout "$((bench_s + 120))" python3 benchmarks/gemm.py --quick --budget-s "$bench_s" --out "$out/RESULTS_gemm.md" \
  > "$out/gemm_bench.log" 2>&1
tail -5 "$out/gemm_bench.log"
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout "$((bench_s + 120))" python3 benchmarks/moe.py --quick --budget-s "$bench_s" \
  --out "$out/RESULTS_moe.md" > "$out/moe_bench.log" 2>&1
tail -5 "$out/moe_bench.log"
