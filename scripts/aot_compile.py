#!/usr/bin/env python
"""Compile every configuration rettn's Triton dispatcher can choose, ahead of time, for sm_80,
sm_86 and sm_90 (no GPU needed), and report registers, spills, shared memory, wgmma, 16-byte
cp.async loads, K/V buffers and compile seconds per configuration.

    python scripts/aot_compile.py [--archs sm_80,sm_86,sm_90] [--dtypes bf16,fp16] \
        [--head-dims 64,72,96,128,256] [--jobs 1] [--json aot.json] [--markdown aot.md]

Compiles into a fresh Triton cache (the compile seconds are real compiles). Exits 1 if any
16-bit configuration has a problem (spills, shared memory over the limit, no wgmma on sm_90,
unvectorised or unpipelined K/V loads); fp32 rows are reported, not judged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _compile(case):
    from rettn.ops import aot

    try:
        r = aot.compile_case(case)
        return case, r.row(), aot.problems(r) if case.dtype != "fp32" else []
    except Exception as e:  # a configuration that fails to compile is a finding, not a crash
        return case, None, [f"compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"]


def markdown(rows) -> str:
    head = ("| configuration | tiles (M x N, warps, stages) | registers | spills (stack/local B) | shared KB "
            "(limit) | wgmma | cp.async 16 B | K/V buffers | compile s |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for name, row, probs in rows:
        if row is None:
            lines.append(f"| {name} | {'; '.join(probs)} | | | | | | | |")
            continue
        lines.append(
            f"| {name} | {row['block_m']} x {row['block_n']}, {row['num_warps']}, {row['num_stages']} | "
            f"{row['registers']} | {row['stack']}/{row['local']} | {row['shared'] / 1024:.0f} "
            f"({row['smem_limit'] / 1024:.0f}) | {row['wgmma']} | {row['cp_async_16']} | {row['kv_buffers']} | "
            f"{row['compile_s']:.1f} |" + (f" **{'; '.join(probs)}**" if probs else ""))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", default="sm_80,sm_86,sm_90")
    ap.add_argument("--dtypes", default="bf16,fp16")
    ap.add_argument("--head-dims", default="64,72,96,128,256")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    ap.add_argument("--keep-cache", action="store_true", help="use the usual Triton cache (faster, times not real)")
    args = ap.parse_args(argv)
    if not args.keep_cache:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="rettn-aot-")
    from rettn.ops import aot
    import triton

    cases = aot.full_matrix(archs=tuple(args.archs.split(",")), dtypes=tuple(args.dtypes.split(",")),
                            head_dims=tuple(int(x) for x in args.head_dims.split(",")))
    print(f"{len(cases)} configurations, triton {triton.__version__}, {args.jobs} job(s)", flush=True)
    start = time.perf_counter()
    rows = []
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            results = list(pool.map(_compile, cases))
    else:
        results = []
        for case in cases:
            results.append(_compile(case))
            _, row, probs = results[-1]
            regs = "-" if row is None else f"{row['registers']} regs, {row['shared'] / 1024:.0f} KB"
            print(f"  {case.name:40s} {regs:20s} {'; '.join(probs)}", flush=True)
    for case, row, probs in results:
        rows.append((case.name, row, probs))
    bad = [(n, p) for n, _, p in rows if p]
    total = time.perf_counter() - start
    print(f"{len(rows)} compiled in {total:.0f} s; {len(bad)} with problems")
    for n, p in bad:
        print(f"  {n}: {'; '.join(p)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"triton": triton.__version__, "seconds": total,
                                               "rows": [dict(row or {}, case=n, problems=p) for n, row, p in rows]},
                                              indent=1))
    if args.markdown:
        Path(args.markdown).write_text(markdown(rows))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
