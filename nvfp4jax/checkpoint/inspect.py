"""``nvfp4jax inspect``: what a checkpoint holds, and what is wrong with it, without loading the model.

Reports the layout, config, shards, per-layer tensor counts / sizes / storage formats, and
anomalies, each naming file and tensor:

* every validation fault of :func:`~nvfp4jax.checkpoint.reader.open_checkpoint` (missing, extra,
  wrong dtype or shape, truncated shards, index pointing at a missing shard, config mismatch);
* missing MTP block (warning: the backbone still loads);
* with ``scan`` (default), per tensor: zero / negative / non-finite NVFP4 global scales
  (``weight_scale_2``, ``global_scale``), zero, subnormal or non-finite ``input_scale`` (warning:
  unused by our recipes), E8M0 scale bytes out of range (255 = NaN, 0 = 2^-127 which float32
  flushes to zero), negative or NaN E4M3 block scales, MXFP4 tensors whose block exponents span
  more than 18 binades (not exactly convertible to NVFP4), non-finite F32 tensors.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from nvfp4jax.checkpoint.layouts import LogicalTensor, layer_key, logical_tensors
from nvfp4jax.checkpoint.reader import CONFIG, Directory, Problem, check_config, check_tensors, detect_layout, scan_directory
from nvfp4jax.config import DeepSeekV4Config
from nvfp4jax.formats.mxfp4 import E4M3_POW2_MAX, E4M3_POW2_MIN

_FLOAT32_MIN_NORMAL = float(np.finfo(np.float32).tiny)


@dataclasses.dataclass
class LayerSummary:
    key: str
    kind: str  # swa / csa / hca, "global"
    tensors: int = 0
    nbytes: int = 0
    formats: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class InspectReport:
    path: str
    layout: str = "?"
    config: DeepSeekV4Config | None = None
    shards: int = 0
    nbytes: int = 0
    dtypes: dict[str, int] = dataclasses.field(default_factory=dict)
    layers: list[LayerSummary] = dataclasses.field(default_factory=list)
    anomalies: list[Problem] = dataclasses.field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.anomalies if p.severity == "error"]


def inspect_checkpoint(path: str | os.PathLike, *, scan: bool = True, progress: bool = True) -> InspectReport:
    """Inspect a checkpoint directory; never raises for a faulty checkpoint (faults become anomalies)."""
    report = InspectReport(os.fspath(path))
    d, problems = scan_directory(path)
    report.anomalies += problems
    if d is None:
        return report
    report.shards = len(d.shards)
    for shard in d.shards.values():
        for e in shard.entries.values():
            report.dtypes[e.dtype] = report.dtypes.get(e.dtype, 0) + 1
            report.nbytes += e.nbytes
    report.layout, stored_recipe = detect_layout(d.config_dict, d.location)
    try:
        cfg = DeepSeekV4Config.from_hf_dict(d.config_dict)
    except ValueError as e:
        report.anomalies.append(Problem("error", os.path.join(d.path, CONFIG), "", str(e)))
        return report
    report.config = cfg
    has_mtp = any(n.startswith("mtp.") for n in d.location)
    if cfg.num_mtp_layers and not has_mtp:
        report.anomalies.append(Problem("warning", d.listing, "mtp.0", "missing MTP: config announces "
                                        f"{cfg.num_mtp_layers} MTP layer(s) but no mtp.* tensors are stored"))
    mismatch = check_config(d, cfg)
    report.anomalies += mismatch
    expected = list(logical_tensors(cfg, report.layout, recipe=stored_recipe or "nvfp4", include_mtp=has_mtp))
    if not mismatch:
        report.anomalies += check_tensors(d, expected)
    report.layers = _layers(d, cfg, expected)
    if scan:
        bad = {p.tensor for p in report.anomalies}
        usable = [t for t in expected if all(s.name in d.location and s.name not in bad for s in t.stored)]
        for t in tqdm(usable, desc="scanning scales", unit="tensor", disable=not progress):
            report.anomalies += _scan(d, t)
    return report


def _layers(d: Directory, cfg: DeepSeekV4Config, expected: list[LogicalTensor]) -> list[LayerSummary]:
    layers: dict[str, LayerSummary] = {}
    for name, file in d.location.items():
        key = layer_key(name)
        if key not in layers:
            index = cfg.num_layers + int(key.split(".")[1]) if key.startswith("mtp.") else (
                int(key.split(".")[1]) if key.startswith("layers.") else None)
            kind = "global" if index is None or index >= len(cfg.compress_ratios) else cfg.layer_type(index)
            layers[key] = LayerSummary(key, kind)
        layers[key].tensors += 1
        layers[key].nbytes += d.shards[file].entries[name].nbytes
    for t in expected:
        key = layer_key(t.name)
        if key in layers and t.stored[0].name in d.location:
            layers[key].formats[t.format] = layers[key].formats.get(t.format, 0) + 1

    def order(s: LayerSummary) -> tuple:
        kind, _, idx = s.key.partition(".")
        return ({"global": 0, "layers": 1, "mtp": 2}.get(kind, 3), int(idx) if idx.isdigit() else 0)

    return sorted(layers.values(), key=order)


def _scan(d: Directory, t: LogicalTensor) -> list[Problem]:
    """Value-level anomalies of one logical tensor (reads only its scales, and MXFP4 codes when needed)."""
    out: list[Problem] = []

    def read(name: str) -> np.ndarray:
        return d.shards[d.location[name]].read(name)

    def flag(name: str, msg: str, severity: str = "error") -> None:
        out.append(Problem(severity, d.file_of(name), name, msg))

    if t.format in ("fp8", "mxfp4"):
        scale_name = f"{t.base}.scale"
        b = read(scale_name).view(np.uint8)
        if np.any(b == 255):
            flag(scale_name, f"{int(np.sum(b == 255))} E8M0 scale bytes are 255 (NaN), first at "
                             f"{tuple(int(i) for i in np.argwhere(b == 255)[0])}")
        if np.any(b == 0):
            flag(scale_name, f"{int(np.sum(b == 0))} E8M0 scale bytes are 0 (2^-127, flushed to zero in float32)")
        if t.format == "mxfp4":
            packed = read(t.name).view(np.uint8)
            nonzero = np.any((packed.reshape(*b.shape, 16) & 0x77) != 0, axis=-1) & (b != 255)
            if nonzero.any():
                e = b[nonzero].astype(np.int32) - 127
                lo, hi = int(e.min()), int(e.max())
                if hi - lo > E4M3_POW2_MAX - E4M3_POW2_MIN:
                    flag(scale_name, f"MXFP4 block exponents span [{lo}, {hi}] ({hi - lo + 1} binades > 18): "
                                     "not exactly convertible to NVFP4 (will be re-quantised)", "warning")
    elif t.format in ("modelopt", "nvfp4"):
        g_name = f"{t.base}.weight_scale_2" if t.format == "modelopt" else f"{t.base}.global_scale"
        g = float(read(g_name).reshape(-1)[0])
        if not np.isfinite(g) or g <= 0:
            flag(g_name, f"global scale is {g!r} (must be finite and > 0)")
        s_name = f"{t.base}.weight_scale" if t.format == "modelopt" else f"{t.base}.scales"
        s = read(s_name).astype(np.float32)
        if not np.all(np.isfinite(s)) or np.any(s < 0):
            flag(s_name, f"{int(np.sum(~(np.isfinite(s) & (s >= 0))))} E4M3 block scales are NaN or negative")
        if t.format == "modelopt":
            i_name = f"{t.base}.input_scale"
            v = float(read(i_name).reshape(-1)[0])
            if not np.isfinite(v) or v < _FLOAT32_MIN_NORMAL:
                flag(i_name, f"input_scale is {v!r} (zero, subnormal or non-finite; unused by our recipes)", "warning")
    elif t.stored[0].dtype == "F32":
        a = read(t.name)
        if not np.all(np.isfinite(a)):
            flag(t.name, f"{int(np.sum(~np.isfinite(a)))} non-finite values")
    return out


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def format_report(r: InspectReport) -> str:
    lines = [f"checkpoint  {r.path}", f"layout      {r.layout}"]
    if r.config is not None:
        c = r.config
        lines.append(f"config      hidden {c.hidden_size}, layers {c.num_layers} (+{c.num_mtp_layers} MTP), heads {c.num_heads}, "
                     f"experts {c.num_experts} (top {c.num_experts_per_token}), vocab {c.vocab_size}")
    lines.append(f"shards      {r.shards}, {sum(r.dtypes.values())} tensors, {_size(r.nbytes)}")
    lines.append("dtypes      " + ", ".join(f"{k} {v}" for k, v in sorted(r.dtypes.items())))
    if r.layers:
        lines.append(f"{'layer':<11}{'type':<8}{'tensors':>8}{'size':>13}  formats")
        for s in r.layers:
            fmts = ", ".join(f"{k} {v}" for k, v in sorted(s.formats.items()))
            lines.append(f"{s.key:<11}{s.kind:<8}{s.tensors:>8}{_size(s.nbytes):>13}  {fmts}")
    lines.append(f"anomalies   {len(r.anomalies)} ({len(r.errors)} errors)")
    lines += [f"  {p.severity:<8}{p}" for p in r.anomalies]
    return "\n".join(lines)


def report_dict(r: InspectReport) -> dict[str, Any]:
    """JSON-friendly form of a report."""
    return {
        "path": r.path, "layout": r.layout, "shards": r.shards, "bytes": r.nbytes, "dtypes": r.dtypes,
        "layers": [dataclasses.asdict(s) for s in r.layers],
        "anomalies": [dataclasses.asdict(p) for p in r.anomalies],
    }
