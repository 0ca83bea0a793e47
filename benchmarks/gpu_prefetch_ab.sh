#!/usr/bin/env bash
# GPU A/B of the opt-in register prefetch depth (GemmConfig.prefetch, $NVFP4JAX_GEMM_PREFETCH):
# correctness first (quick GEMM and MoE tests at depth 2 and 3), then a decode-config sweep and the
# MoE benchmark at the depth given (default 2). Every log in OUTDIR; each stage under its own limit,
# so a run cut short still leaves what it measured.
# Usage: bash benchmarks/gpu_prefetch_ab.sh OUTDIR [DEPTH_FOR_MOE_BENCH]
set -u
out=${1:?usage: gpu_prefetch_ab.sh OUTDIR [DEPTH]}
depth=${2:-2}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$out/gpu.txt"
P="python3 -m pytest -o addopts= -q -x -m gpu -p no:warnings --tb=short -rf"
for d in 2 3; do
  for t in "tests/kernels/test_gemm.py -k w4a4_or_w4a16" "tests/kernels/test_moe.py"; do
    set -- $t
    name=$(basename "$1" .py)
    sel=(); [ $# -gt 2 ] && sel=(-k "$(echo "$3" | sed 's/_or_/ or /')")
    NVFP4JAX_GEMM_PREFETCH=$d XLA_FLAGS=--xla_gpu_autotune_level=0 NVFP4JAX_GPU_TESTS=quick timeout 150 \
      $P "$1" "${sel[@]}" > "$out/${name}_prefetch$d.log" 2>&1
    echo "prefetch $d $name: $(tail -1 "$out/${name}_prefetch$d.log")"
  done
done
timeout 300 python3 benchmarks/gemm_tune.py --names wq_b,wo_b,shared.w1/w3 --m 1,16 \
  --splits 1,2,4,8 --prefetch 1,2,3 --budget-s 240 > "$out/tune.log" 2>&1
cat "$out/tune.log"
NVFP4JAX_GEMM_PREFETCH=$depth XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 300 python3 benchmarks/moe.py --quick \
  --budget-s 200 > "$out/moe_prefetch$depth.log" 2>&1
grep -E "^\|" "$out/moe_prefetch$depth.log"
