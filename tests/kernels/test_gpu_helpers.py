"""CPU: the GPU tests' helpers behave as those tests assume."""

import os

import jax
import jax.numpy as jnp

from tests.kernels._gpu import fresh_jit


def test_fresh_jit_reads_trace_time_settings(monkeypatch):
    """Tests that switch a kernel path with an ``NVFP4JAX_*`` variable need a fresh trace per setting:
    ``jax.jit(fn)`` shares one trace cache per function (a second wrapper reuses the first trace),
    ``fresh_jit(fn)`` does not."""

    def fn(x):
        return x + (1.0 if os.environ.get("NVFP4JAX_TEST_SETTING") == "a" else 2.0)

    x = jnp.zeros(3)
    monkeypatch.setenv("NVFP4JAX_TEST_SETTING", "a")
    assert float(jax.jit(fn)(x)[0]) == 1.0 and float(fresh_jit(fn)(x)[0]) == 1.0
    monkeypatch.setenv("NVFP4JAX_TEST_SETTING", "b")
    assert float(jax.jit(fn)(x)[0]) == 1.0  # the pitfall: the first trace again
    assert float(fresh_jit(fn)(x)[0]) == 2.0


def test_gpu_session_splits_the_gemm_ws_tests():
    """``benchmarks/gpu_session.sh``'s stages ``ws-tma`` and ``ws`` select, by their ``-k`` expressions,
    exactly the W-by-TMA cases of ``tests/kernels/test_gemm_ws.py`` (with the whole-V4-Pro-bank, the tail
    MoE and the two-producer cases, for the time: ``ws`` is full) and the rest. ``-k`` also matches a
    module's global names, so a plain ``tma`` matched every case through ``TMA_CASES`` (the expressions
    written in session 8 selected 2 of 48 cases and all 50 instead)."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    pytest.importorskip("cutlass")  # the module imports the kernels
    root = Path(__file__).resolve().parents[2]
    script = (root / "benchmarks/gpu_session.sh").read_text()
    exprs = {name: re.search(rf'^{name}="([^"]+)"$', script, re.M).group(1) for name in ("WS_TMA", "WS_REGS")}

    def collect(*k):
        out = subprocess.run([sys.executable, "-m", "pytest", "-o", "addopts=", "-p", "no:cacheprovider", "-m", "gpu",
                              "--collect-only", "-q", "tests/kernels/test_gemm_ws.py", *k],
                             cwd=root, capture_output=True, text=True, check=True).stdout
        return {line for line in out.splitlines() if "::" in line}

    every, tma, rest = collect(), collect("-k", exprs["WS_TMA"]), collect("-k", exprs["WS_REGS"])
    by_tma = {t for t in every if re.search(r"-tma\]$", t) or "whole_pro_bank" in t or "ws_tail" in t
              or "two_producers" in t}
    assert by_tma and tma == by_tma and rest == every - by_tma, (sorted(tma), sorted(rest))


def test_gemm_benchmark_stops_at_its_budget_and_names_the_rest(monkeypatch):
    """``benchmarks/gemm.py`` checks ``--budget-s`` after each m (session 12: a shape is timed one m at a
    time, so a run cut short keeps the m values done) and names every (shape, m) left unmeasured."""
    import argparse
    import sys
    from pathlib import Path

    import pytest

    pytest.importorskip("cutlass")  # the benchmark imports the kernels
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks import gemm as bg

    clock = iter(range(100))
    monkeypatch.setattr(bg.time, "time", lambda: float(next(clock)))  # one second per m
    times = {"w4a4": 2e-6, "w4a16": 1e-6, "bf16": 4e-6, "fp8": 3e-6}
    monkeypatch.setattr(bg, "bench_shape", lambda n, k, ms, modes, linear: ((m, times, 1e3, 1e3) for m in ms))
    shapes = [("flash", "wq_a", 1024, 4096, (1, 16, 64)), ("flash", "wkv", 512, 4096, (1, 16))]
    args = argparse.Namespace(modes="", linear=False, budget_s=0.5)  # past it at the second m
    lines = []
    bg.bench_shapes(args, shapes, 3.0e12, 8.0e14, 0.0, lines)
    assert [line.split(" | ")[4] for line in lines[:-1]] == ["1", "16"], lines
    assert lines[-1] == "| (stopped by the time budget after flash wq_a m = 16: not measured m > 16, flash wkv) |"
    lines = []
    bg.bench_shapes(argparse.Namespace(modes="", linear=False, budget_s=1e9), shapes, 3.0e12, 8.0e14, 0.0, lines)
    assert len(lines) == 5 and "stopped" not in lines[-1]  # no stop row after the last m of the last shape


def test_ncu_source_top_ranks_instructions_by_excess_shared_wavefronts(tmp_path):
    """``benchmarks/ncu_source_top.py`` (the ``ncu-src`` stage's reader): finds the header below ncu's
    preamble, tells the excess column from the plain wavefront column, ranks by excess."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks.ncu_source_top import top_rows

    csv_file = tmp_path / "source.csv"
    csv_file.write_text(
        '"Kernel Name","gemm"\n'
        '"Address","Source","L1 Wavefronts Shared Excessive","L1 Wavefronts Shared"\n'
        '"0x10","LDS.128 R4, [R2]","2,048","4,096"\n"0x20","STS.128 [R3], R8","0","4,096"\n'
        '"0x30","STS.U16 [R5], R9","7000","9000"\n')
    lines = top_rows(str(csv_file), 2)
    assert "'L1 Wavefronts Shared Excessive'" in lines[0] and "wavefronts = 'L1 Wavefronts Shared'" in lines[0]
    assert [line.split(" | ")[-1] for line in lines[1:]] == ["STS.U16 [R5], R9", "LDS.128 R4, [R2]"]
    assert lines[2].split(" | ")[0].strip() == "2,048" and lines[2].split(" | ")[1].strip() == "4,096"
