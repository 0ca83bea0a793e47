"""`nvfp4jax generate --devices N` on fake CPU devices gives the single-device tokens.

With ``--devices 2`` the mesh is (data 1, expert 2, tensor 1): the routed experts are split over
two devices and tokens reach them by all-to-all, which is bitwise equal to the dense MoE, so the
greedy tokens must be identical.
"""

import os
import re
import subprocess
import sys


def _tokens(extra_env: dict, *args: str) -> list[int]:
    env = {**os.environ, **extra_env}
    cmd = [sys.executable, "-m", "nvfp4jax.cli", "generate", "--prompt", "hi", "--max-new-tokens", "4", *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    line = re.search(r"\[0\] tokens: \[([0-9, ]*)\]", out.stdout)
    assert line, out.stdout[-2000:]
    return [int(t) for t in line.group(1).split(",")]


def test_generate_on_two_fake_devices_equals_one_device():
    one = _tokens({})
    two = _tokens({"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}, "--devices", "2")
    assert len(one) == 4 and two == one


def test_more_devices_than_visible_is_a_clear_error():
    env = {**os.environ}
    cmd = [sys.executable, "-m", "nvfp4jax.cli", "generate", "--prompt", "hi", "--devices", "64"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2 and "only 1 devices are visible" in out.stderr
