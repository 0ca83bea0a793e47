"""The benchmarks' trace reader (``benchmarks/_timing.py``) on a synthetic perfetto trace (CPU).

On the GPU, kernel times come from the JAX profiler's perfetto JSON: device events of the stream
lines inside each call's host annotation. Here a hand-made trace checks the attribution: kernels
outside every window, on the host, or repeated on the "XLA Ops" line must not be counted.
"""

import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._timing import _kernels_per_window, checked, count_cutedsl, device_times, source_fingerprint  # noqa: E402
import pytest  # noqa: E402


def _meta(pid, name, tid=None):
    if tid is None:
        return {"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}}
    return {"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": name}}


def test_kernels_are_attributed_to_their_call_window(tmp_path):
    host, gpu = 1, 2
    events = [
        _meta(host, "/host:CPU"), _meta(host, "python", tid=10),
        _meta(gpu, "/device:GPU:0"), _meta(gpu, "Stream #13(Compute)", tid=13), _meta(gpu, "XLA Ops", tid=99),
        {"ph": "X", "pid": host, "tid": 10, "ts": 100.0, "dur": 50.0, "name": "case:gemm#0"},
        {"ph": "X", "pid": host, "tid": 10, "ts": 200.0, "dur": 50.0, "name": "case:gemm#1"},
        # call 0: two kernels; the flush before it (ts 90) is outside every window
        {"ph": "X", "pid": gpu, "tid": 13, "ts": 90.0, "dur": 5.0, "name": "loop_add_fusion"},
        {"ph": "X", "pid": gpu, "tid": 13, "ts": 110.0, "dur": 20.0, "name": "kernel_cutlass_kernel_gemm"},
        {"ph": "X", "pid": gpu, "tid": 13, "ts": 135.0, "dur": 2.0, "name": "loop_reduce_fusion"},
        {"ph": "X", "pid": gpu, "tid": 99, "ts": 110.0, "dur": 20.0, "name": "kernel_cutlass_kernel_gemm"},  # repeat
        {"ph": "X", "pid": host, "tid": 10, "ts": 120.0, "dur": 1.0, "name": "host op"},
        # call 1: one kernel
        {"ph": "X", "pid": gpu, "tid": 13, "ts": 210.0, "dur": 30.0, "name": "kernel_cutlass_kernel_gemm"},
    ]
    path = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    per = _kernels_per_window(path)
    assert per["gemm#0"] == [("kernel_cutlass_kernel_gemm", 110.0, 20.0), ("loop_reduce_fusion", 135.0, 2.0)]
    assert per["gemm#1"] == [("kernel_cutlass_kernel_gemm", 210.0, 30.0)]
    assert set(per) == {"gemm#0", "gemm#1"}
    assert count_cutedsl([n for n, _, _ in per["gemm#0"]]) == 1


def test_device_times_without_a_gpu_reports_wall_time_and_errors():
    import jax.numpy as jnp

    def broken(x):
        raise ValueError("no kernel for this shape")

    res = device_times({"ok": (lambda x: x + 1, (jnp.ones(4),)), "bad": (broken, (jnp.ones(4),))}, reps=3)
    assert res["ok"]["kernels"] > 0 and res["ok"]["span"] == res["ok"]["kernels"]
    assert isinstance(res["bad"]["error"], ValueError)
    with pytest.raises(ValueError, match="no kernel for this shape"):
        checked(res["bad"])


def test_checked_requires_our_kernels_in_the_call():
    ours = {"kernels": 2e-5, "span": 2.1e-5, "per_kernel": [("kernel_cutlass_kernel_gemm", 1.9e-5),
                                                             ("loop_reduce_fusion", 1e-6)]}
    assert checked(ours, 1) is ours
    with pytest.raises(RuntimeError, match="1 CuTeDSL kernels in the trace, expected >= 2"):
        checked(ours, 2)
    xla_only = {"kernels": 3e-5, "span": 3e-5, "per_kernel": [("gemm_fusion_dot_1", 3e-5)]}
    assert checked(xla_only) is xla_only
    with pytest.raises(RuntimeError, match="0 CuTeDSL kernels"):
        checked(xla_only, 1)


def test_source_fingerprint_follows_the_package_sources(tmp_path):
    pkg = tmp_path / "nvfp4jax" / "kernels"
    pkg.mkdir(parents=True)
    (pkg / "gemm.py").write_text("x = 1\n")
    (tmp_path / "README.md").write_text("not a source\n")
    first = source_fingerprint(tmp_path)
    (tmp_path / "README.md").write_text("changed\n")
    assert source_fingerprint(tmp_path) == first and len(first) == 12
    (pkg / "gemm.py").write_text("x = 2\n")
    assert source_fingerprint(tmp_path) != first
