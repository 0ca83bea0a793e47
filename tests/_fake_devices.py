"""Run a test module's cases again in a subprocess that has 8 fake CPU devices (a JUnit report is read back)."""

import os
import subprocess
import sys
import xml.etree.ElementTree as ET

NUM_DEVICES = 8
#: devices the sharded-equality cases of tests/test_sharding.py use: the 8 fake CPU devices, or, with
#: ``NVFP4JAX_MESH_DEVICES=N``, the N real devices of a multi-GPU machine (cases run directly there)
MESH_DEVICES = int(os.environ.get("NVFP4JAX_MESH_DEVICES", NUM_DEVICES))


def run_on_fake_devices(test_file: str, tmp_path, timeout: int) -> None:
    """Run every case of ``test_file`` except the ``eight_fake_cpu_devices`` runner itself in a
    subprocess with ``NUM_DEVICES`` fake CPU devices; fail unless all ran and passed (none skipped)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2",
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={NUM_DEVICES}"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    report = tmp_path / "report.xml"
    r = subprocess.run([sys.executable, "-m", "pytest", os.path.abspath(test_file), "-p", "no:cacheprovider",
                        "-n", "0", "-p", "no:warnings", "-k", "not eight_fake_cpu_devices", f"--junitxml={report}"],
                       check=False, env=env, cwd=root, capture_output=True, text=True, timeout=timeout)
    tail = r.stdout[-6000:] + r.stderr[-2000:]
    assert r.returncode == 0, tail
    # counts from the JUnit report (the terminal summary is not a stable interface)
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests, failed = int(suite.get("tests")), int(suite.get("failures")) + int(suite.get("errors"))
    skipped = int(suite.get("skipped"))
    assert tests > 0 and failed == 0 and skipped == 0, f"{tests=} {failed=} {skipped=}\n{tail}"
