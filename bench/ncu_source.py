"""Summarise Nsight Compute's source page (`ncu -i REP --page source --csv --print-source ...`):
the instructions (or source lines) with the most excessive global sectors, excessive shared
wavefronts, stall samples and executed instructions. Used by bench/gpu.sh's 'ncusrc KIND' step.

    python3 bench/ncu_source.py page.csv [--top 25] [--stalls]

--stalls first prints the kernel's stall reasons summed over all its instructions (the sampled
warps of each `stall_*` column, as a share of all samples): 'no_inst' is a warp waiting for its
next instruction to be fetched (code not in the SM's instruction cache), 'long_sb' for global
or local memory, 'barrier' at a __syncthreads, 'wait' / 'short_sb' / 'math' on the pipelines.
"""
from __future__ import annotations

import argparse
import csv
import sys

WANT = ("L2 Theoretical Sectors Global Excessive", "L1 Wavefronts Shared Excessive",
        "Warp Stall Sampling (All Samples)", "Instructions Executed", "L2 Theoretical Sectors Global")


def _num(s: str) -> float:
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return 0.0


def stall_totals(head: list[str], body: list[list[str]]) -> dict[str, float]:
    """{reason: samples} summed over the instructions, for each `stall_*` column (all samples,
    not the 'Not Issued' copies)."""
    cols = {c[len("stall_"):]: i for i, c in enumerate(head) if c.startswith("stall_") and "Not Issued" not in c}
    return {name: sum(_num(r[i]) for r in body) for name, i in cols.items()}


def stall_table(head: list[str], body: list[list[str]]) -> str:
    totals = stall_totals(head, body)
    all_samples = sum(totals.values())
    if not all_samples:
        return "== stall reasons: no stall_* columns with samples in this page"
    lines = [f"== stall reasons over the whole kernel ({all_samples:,.0f} samples)"]
    for name, v in sorted(totals.items(), key=lambda kv: -kv[1]):
        if v > 0:
            lines.append(f"{name:<22}{v:14,.0f} {100 * v / all_samples:6.1f}%")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--stalls", action="store_true", help="print the summed stall reasons first")
    a = ap.parse_args(argv)
    rows = list(csv.reader(open(a.csv, newline="", errors="replace")))
    hi = next((i for i, r in enumerate(rows) if any(c in ("Source", "Address") for c in r)), None)
    if hi is None:
        print(f"{a.csv}: no header row with 'Source' or 'Address'; first rows: {rows[:3]}")
        return 1
    head, body = rows[hi], [r for r in rows[hi + 1:] if len(r) == len(rows[hi])]
    print("columns:", head)
    text = [i for i, c in enumerate(head) if c in ("Source", "Address", "#")]
    if a.stalls:
        print(stall_table(head, body))
    cols = {w: head.index(w) for w in WANT if w in head}
    for w, ci in cols.items():
        total = sum(_num(r[ci]) for r in body)
        print(f"\n== top {a.top} by {w} (total {total:,.0f})")
        for r in sorted(body, key=lambda r: -_num(r[ci]))[:a.top]:
            v = _num(r[ci])
            if v <= 0:
                break
            extra = "  ".join(f"{head[c][:12]}={r[c]}" for c in cols.values() if c != ci)
            print(f"{v:14,.0f} {100 * v / max(total, 1):5.1f}%  {' | '.join(r[i].strip()[:110] for i in text)}  [{extra}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
