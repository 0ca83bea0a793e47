"""The jitted MXFP4 -> NVFP4 path of the loader equals :func:`formats.mxfp4_to_nvfp4` bit for bit."""

import numpy as np
import pytest

from nvfp4jax import formats
from nvfp4jax.checkpoint.decode import _mxfp4_to_nvfp4, decode
from nvfp4jax.checkpoint.layouts import LogicalTensor
from nvfp4jax.checkpoint.safetensors_io import CheckpointError
from nvfp4jax.checkpoint.synthetic import e8m0_bytes
from nvfp4jax.config import preset
from tests.conftest import assert_bitwise_equal


def expert(out: int, inp: int) -> LogicalTensor:
    return LogicalTensor("x.weight", (out, inp), "mxfp4", (), "big")


def mxfp4_case(rng, case: str):
    w = rng.standard_normal((6, 64)).astype(np.float32)
    if case == "zero_blocks":
        w[1, :32] = 0.0
        w[4] = 0.0
    elif case == "all_zero":
        w[:] = 0.0
    elif case == "span_17":  # 18 binades of block exponents: the widest that converts exactly
        w[0, :32] *= np.float32(2.0**-17)
    elif case == "span_18":
        w[0, :32] *= np.float32(2.0**-18)
    elif case == "wide":
        w[2] *= np.float32(2.0**-30)
    q = formats.encode_mxfp4(w)
    weight, scale = np.asarray(q.weight), np.asarray(q.scale)
    if case in ("zero_blocks", "all_zero"):  # zero blocks may carry any exponent
        scale = scale.copy()
        scale[1, 0] = 3
        scale[4, :] = 250
    return weight, scale


@pytest.mark.parametrize("case", ["random", "zero_blocks", "all_zero", "span_17", "span_18", "wide"])
def test_fast_mxfp4_path_equals_formats(rng, case):
    weight, scale = mxfp4_case(rng, case)
    expected, expected_report = formats.mxfp4_to_nvfp4(weight, scale, strict=False)
    arrays = {"x.weight": weight, "x.scale": e8m0_bytes(scale)}
    out, report = _mxfp4_to_nvfp4(expert(*weight.shape[:1], weight.shape[1] * 2), arrays, lambda n: "f")
    for field in ("values", "scales", "global_scale"):
        assert_bitwise_equal(getattr(out, field), getattr(expected, field), f"{case} {field}")
    assert report == expected_report, f"{case}: {report} != {expected_report}"
    assert report.exact == (case not in ("span_18", "wide")), report.describe()


def test_nan_scale_of_an_expert_is_an_error(rng):
    weight, scale = mxfp4_case(rng, "random")
    scale = scale.copy()
    scale[2, 1] = 255
    t = expert(6, 64)
    with pytest.raises(CheckpointError, match=r"^file-of-x\.scale: tensor 'x\.scale': E8M0 byte 255 \(NaN\) at \(2, 1\)"):
        decode(t, {"x.weight": weight, "x.scale": e8m0_bytes(scale)}, preset("tiny"), "nvfp4", lambda n: f"file-of-{n}")
