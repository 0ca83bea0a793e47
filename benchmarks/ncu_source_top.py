"""The SASS instructions with the most shared-memory wavefronts (and excess wavefronts: bank conflicts)
in an Nsight Compute source-page CSV (``ncu -i REPORT --page source --csv --print-source sass``).

Session 12's ncu of gemm_ws (Flash wq_a, m = 16384, W4A16, W by TMA) counted 19% excess wavefronts on its
shared loads and 13% on its shared stores, but the text pages do not say which instructions; on paper the
W decode's 16-byte stores (128-byte swizzle, thread t on row t // 2) and the epilogue's padded staging are
conflict-free, while the raw-slot code reads (16 bytes at row * 64 + chunk * 16) are 2-way. This names them.

Usage: ``python benchmarks/ncu_source_top.py SOURCE.csv [N]`` (any machine; the CSV's column names are
matched loosely, as ncu versions name them differently).
"""

from __future__ import annotations

import csv
import sys


def _number(text: str) -> float:
    try:
        return float(text.replace(",", "").strip() or 0)
    except ValueError:
        return 0.0


def top_rows(path: str, n: int = 25) -> list[str]:
    """Lines ``excess | wavefronts | address | source`` of the ``n`` instructions with the most excess
    shared wavefronts (then the most shared wavefronts)."""
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    header_at = next(i for i, r in enumerate(rows) if any("Source" in c for c in r))
    header, body = rows[header_at], rows[header_at + 1:]

    def col(*words: str, without: str = "\0") -> int | None:
        for i, name in enumerate(header):
            low = name.lower()
            if all(w in low for w in words) and without not in low:
                return i
        return None

    src, addr = col("source"), col("address")
    excess = col("shared", "excessive")
    excess = col("bank", "conflict") if excess is None else excess
    waves = col("wavefronts", "shared", without="excess")
    if src is None or excess is None:
        raise SystemExit(f"{path}: no source / shared-excess column in {header}")
    scored = sorted(body, key=lambda r: (_number(r[excess]), _number(r[waves]) if waves is not None else 0),
                    reverse=True)
    out = [f"columns: excess = {header[excess]!r}" + (f", wavefronts = {header[waves]!r}" if waves is not None else "")]
    for r in scored[:n]:
        w = r[waves] if waves is not None else "-"
        out.append(f"{r[excess]:>12} | {w:>12} | {r[addr] if addr is not None else '-'} | {r[src].strip()}")
    return out


if __name__ == "__main__":
    print("\n".join(top_rows(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 25)))
