"""Device time of jitted calls, from the JAX profiler's trace (GPU), L2 flushed before every call.

``device_times(cases, reps)`` compiles and warms each case (``name -> (fn, args)``), then inside one
``jax.profiler.trace`` runs every case ``reps`` times, each call preceded by a blocking write of a
256 MiB buffer (so the call finds none of its operands in the 50 MB L2) and wrapped in a host
annotation that ends with ``block_until_ready``. The trace's device events (stream lines) inside a
call's annotation are that call's kernels. Per case it returns the medians over the repeats of

* ``kernels``: the sum of the call's kernel durations (what ``do_bench`` / CUDA events around each
  kernel measure; excludes launch gaps between the kernels of one XLA program), and
* ``span``: first kernel start to last kernel end (includes those gaps),

plus the (name, seconds) of each kernel of the median run. Timing a loop of calls instead (the method used before)
was distorted: the 128 MiB flush inside the loop left L2 full of dirty lines that the next kernel
had to write back (XLA's BF16 m=1 GEMV measured 55.8 us in the loop vs 32.0 us of kernel time),
and each iteration's glue ops were counted.

Without a GPU (``--cpu-smoke`` runs) it returns wall-clock seconds per call instead (``kernels`` =
``span``), which measure nothing of a GPU.
"""

from __future__ import annotations

import datetime
import gzip
import hashlib
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp

FLUSH_BYTES = 256 << 20


def _on_gpu() -> bool:
    return jax.devices()[0].platform == "gpu"


def device_times(cases: dict, reps: int = 5) -> dict[str, dict]:
    """``{name: {"kernels": s, "span": s, "per_kernel": [(kernel name, s), ...]}}``; see the module docstring.

    A case whose compile or run raises is returned as ``{"error": exception}``.
    """
    out, ready = {}, {}
    for name, (fn, args) in cases.items():
        try:
            f = jax.jit(fn)
            jax.block_until_ready(f(*args))
            ready[name] = (f, args)
        except Exception as e:  # noqa: BLE001 -- recorded as the case's result
            out[name] = {"error": e}
    if not _on_gpu():
        for name, (f, args) in ready.items():
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                jax.block_until_ready(f(*args))
                ts.append(time.perf_counter() - t)
            out[name] = {"kernels": statistics.median(ts), "span": statistics.median(ts), "per_kernel": []}
        return out
    flush = jax.jit(lambda b: b + jnp.uint8(1))
    buf = flush(jnp.zeros((FLUSH_BYTES,), jnp.uint8))
    opts = jax.profiler.ProfileOptions()
    opts.python_tracer_level = 0
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True, profiler_options=opts):
            for name, (f, args) in ready.items():
                for rep in range(reps):
                    buf = jax.block_until_ready(flush(buf))
                    try:
                        with jax.profiler.TraceAnnotation(f"case:{name}#{rep}"):
                            jax.block_until_ready(f(*args))
                    except Exception as e:  # noqa: BLE001
                        out[name] = {"error": e}
                        break
        runs = _kernels_per_window(next(Path(tmp).rglob("perfetto_trace.json.gz")))
    for name in ready:
        if name in out:
            continue
        reps_k = [runs.get(f"{name}#{r}", []) for r in range(reps)]
        if not all(reps_k):
            out[name] = {"error": RuntimeError("no device kernels found in the trace for this call")}
            continue
        sums = [sum(d for _, _, d in ks) for ks in reps_k]
        spans = [max(t + d for _, t, d in ks) - min(t for _, t, _ in ks) for ks in reps_k]
        median_run = reps_k[sorted(range(reps), key=lambda i: sums[i])[reps // 2]]
        out[name] = {"kernels": statistics.median(sums) * 1e-6, "span": statistics.median(spans) * 1e-6,
                     "per_kernel": [(n, d * 1e-6) for n, _, d in median_run]}
    return out


def checked(result: dict, min_cutedsl: int = 0) -> dict:
    """A ``device_times`` result, or raise: its error, or a RuntimeError when the call ran fewer than
    ``min_cutedsl`` CuTeDSL kernels (a timing of ours without our kernel would be invalid)."""
    if "error" in result:
        raise result["error"]
    names = [n for n, _ in result["per_kernel"]]
    if count_cutedsl(names) < min_cutedsl:
        raise RuntimeError(f"{count_cutedsl(names)} CuTeDSL kernels in the trace, expected >= {min_cutedsl}: {names}")
    return result


def _kernels_per_window(path: Path) -> dict[str, list]:
    """``{annotation: [(kernel name, start us, duration us), ...]}`` from a perfetto trace."""
    events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    pids = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    tids = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
            if e.get("ph") == "M" and e.get("name") == "thread_name"}
    windows = sorted((e["ts"], e["ts"] + e["dur"], e["name"][5:]) for e in events
                     if e.get("ph") == "X" and str(e.get("name", "")).startswith("case:"))
    per = defaultdict(list)
    for e in events:
        if e.get("ph") != "X" or "dur" not in e or "/device:GPU" not in pids.get(e["pid"], ""):
            continue
        if "Stream" not in tids.get((e["pid"], e["tid"]), "Stream"):  # "XLA Ops"/"XLA Modules" repeat them
            continue
        for t0, t1, case in windows:
            if t0 <= e["ts"] <= t1:
                per[case].append((e["name"], e["ts"], e["dur"]))
                break
    return per


def count_cutedsl(names: list[str]) -> int:
    """CuTeDSL kernels among a call's kernel names (their symbols start ``kernel_cutlass``)."""
    return sum(n.startswith("kernel_cutlass") for n in names)


def source_fingerprint(root: Path | None = None) -> str:
    """12 hex digits of SHA-1 over ``nvfp4jax/**/*.py`` (paths and bytes) under ``root`` (the repo).

    Recorded beside the commit in benchmark headers: on the GPU machine the working tree arrives as a
    copy whose git metadata can be stale, so ``git rev-parse`` there may name an older commit. Match a
    result to a commit with ``python -c "from benchmarks._timing import source_fingerprint as f; print(f())"``
    on a checkout of it.
    """
    root = Path(__file__).resolve().parents[1] if root is None else Path(root)
    h = hashlib.sha1()
    for path in sorted((root / "nvfp4jax").rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def append_results(path: str, title: str, lines: list[str]) -> None:
    """Append a result table to ``path`` under ``## title — card, date, commit, source fingerprint``.

    The commit is ``$NVFP4JAX_COMMIT``, else ``git rev-parse`` (may be stale on the GPU machine: the
    source fingerprint is what identifies the code)."""
    commit = os.environ.get("NVFP4JAX_COMMIT", "")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    check=False).stdout.strip()
        except OSError:
            commit = ""
    head = (f"\n## {title} — {jax.devices()[0].device_kind}, {datetime.date.today()}, commit {commit or 'unknown'}, "
            f"source {source_fingerprint()}\n\n")
    with open(path, "a") as f:
        f.write(head + "\n".join(lines) + "\n")
