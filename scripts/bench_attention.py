#!/usr/bin/env python
"""Attention benchmark: dense SDPA vs rettn block-sparse vs FlexAttention on the same layout.

Side by side in one run, on one machine: every provider is timed in the same process, with the
same inputs, interleaved, and the median is reported. Block selection is timed apart from the
sparse kernel. Prints a table and writes JSON (device, versions, exact command, rows).

    python scripts/bench_attention.py                      # CPU sweep (default)
    python scripts/bench_attention.py --preset cogvideox   # CogVideoX-2B shape (GPU)
    python scripts/bench_attention.py --seq 4096 --keep 0.0625 --block 64 --providers sdpa,rettn
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rettn  # noqa: E402
from rettn import selection  # noqa: E402
from rettn.profiler import _cpu_name  # noqa: E402

PRESETS = {
    # The CI-sized CPU target of issue 2: sparse torch path >= 4x dense SDPA at keep 1/16.
    "cpu": dict(batch=1, heads=8, seq=[2048, 4096], head_dim=64, dtype="float32",
                keep=[0.25, 0.125, 0.0625], block=64),
    # CogVideoX-2B at 49 frames 720x480 with CFG: 17,776 tokens, 30 heads.
    "cogvideox": dict(batch=2, heads=30, seq=[17776], head_dim=64, dtype="bfloat16",
                      keep=[0.0625, 0.03125], block=128),
}
TARGETS = {
    "cpu": dict(seq=4096, keep=0.0625, min_speedup_vs_sdpa=4.0, max_select_share=0.20),
    "cogvideox": dict(seq=17776, keep=0.03125, min_speedup_vs_sdpa=15.0, min_speedup_vs_flex=1.5,
                      max_dense_vs_sdpa=1.3),
}
ALL_PROVIDERS = ("sdpa", "rettn", "flex", "dense_lse")


def timer(device: torch.device):
    """Returns f(fn) -> seconds for one call, synchronised on GPU."""
    if device.type == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        def run(fn):
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t
    return run


def measure(fns: dict, device, repeats: int, warmup: int) -> dict:
    """Median seconds per provider, calls interleaved round-robin so noise hits all alike."""
    run = timer(device)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(run(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def bench_one(args, seq, keep, providers, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (args.batch, args.heads, seq, args.head_dim)
    q, k, v = (torch.randn(*shape, generator=g).to(device=device, dtype=dtype) for _ in range(3))

    def select():
        if args.selection == "window":
            return selection.window(seq, keep, args.block, device=device)
        return selection.topk(q, k, keep, block_q=args.block)

    layout = select()
    fns = {"select": select}
    if "sdpa" in providers:
        fns["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v)
    if "rettn" in providers:
        fns["rettn"] = lambda: rettn.block_sparse_attention(q, k, v, layout)
        fns["rettn_lse"] = lambda: rettn.block_sparse_attention(q, k, v, layout, return_lse=True)
    if "dense_lse" in providers:
        fns["dense_lse"] = lambda: rettn.attention_with_lse(q, k, v)
    compile_s = None
    if "flex" in providers:
        try:
            t = time.perf_counter()
            rettn.block_sparse_attention(q, k, v, layout, backend="flex")  # compile, excluded
            if device.type == "cuda":
                torch.cuda.synchronize()
            compile_s = time.perf_counter() - t
            fns["flex"] = lambda: rettn.block_sparse_attention(q, k, v, layout, backend="flex")
        except Exception as e:  # report, do not hide: flex may not run on this machine
            print(f"  flex unavailable at seq={seq}: {type(e).__name__}: {e}", file=sys.stderr)
    med = measure(fns, device, args.repeats, args.warmup)
    from rettn.attention import _auto_backend

    row = dict(seq=seq, keep=keep, density=layout.density(), backend=_auto_backend(q, layout),
               ms={name: 1e3 * s for name, s in med.items()}, flex_compile_s=compile_s)
    ms = row["ms"]
    if "rettn" in ms:
        row["select_share"] = ms["select"] / ms["rettn"]
        if "sdpa" in ms:
            row["speedup_vs_sdpa"] = ms["sdpa"] / ms["rettn"]
            row["speedup_vs_sdpa_with_select"] = ms["sdpa"] / (ms["rettn"] + ms["select"])
        if "flex" in ms:
            row["speedup_vs_flex"] = ms["flex"] / ms["rettn"]
    if "dense_lse" in ms and "sdpa" in ms:
        row["dense_lse_vs_sdpa"] = ms["dense_lse"] / ms["sdpa"]
    return row


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def print_table(rows):
    head = ("seq", "keep", "density", "sdpa ms", "rettn ms", "+lse ms", "select ms", "flex ms",
            "dense_lse ms", "x sdpa", "x sdpa+sel", "x flex", "sel/kern")
    print(" | ".join(head))
    for r in rows:
        ms = r["ms"]
        print(" | ".join([
            str(r["seq"]), f"{r['keep']:.4f}", f"{r['density']:.4f}", fmt(ms.get("sdpa")),
            fmt(ms.get("rettn")), fmt(ms.get("rettn_lse")), fmt(ms.get("select")), fmt(ms.get("flex")),
            fmt(ms.get("dense_lse")), fmt(r.get("speedup_vs_sdpa")),
            fmt(r.get("speedup_vs_sdpa_with_select")), fmt(r.get("speedup_vs_flex")),
            fmt(r.get("select_share"), ".1%"),
        ]))


def check_targets(preset, rows):
    target = TARGETS.get(preset)
    if not target:
        return None
    row = next((r for r in rows if r["seq"] == target["seq"] and math.isclose(r["keep"], target["keep"])), None)
    if row is None:
        return None
    result = {}
    if "min_speedup_vs_sdpa" in target and "speedup_vs_sdpa" in row:
        result["speedup_vs_sdpa"] = (row["speedup_vs_sdpa"], target["min_speedup_vs_sdpa"],
                                     row["speedup_vs_sdpa"] >= target["min_speedup_vs_sdpa"])
    if "max_select_share" in target and "select_share" in row:
        result["select_share"] = (row["select_share"], target["max_select_share"],
                                  row["select_share"] <= target["max_select_share"])
    if "min_speedup_vs_flex" in target and "speedup_vs_flex" in row:
        result["speedup_vs_flex"] = (row["speedup_vs_flex"], target["min_speedup_vs_flex"],
                                     row["speedup_vs_flex"] >= target["min_speedup_vs_flex"])
    if "max_dense_vs_sdpa" in target and "dense_lse_vs_sdpa" in row:
        result["dense_lse_vs_sdpa"] = (row["dense_lse_vs_sdpa"], target["max_dense_vs_sdpa"],
                                       row["dense_lse_vs_sdpa"] <= target["max_dense_vs_sdpa"])
    return result


def environment(device):
    env = dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
               threads=torch.get_num_threads(), device=str(device))
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return env


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a named shape sweep (default: 'cogvideox' on CUDA, 'cpu' otherwise)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--seq", type=int, nargs="+", default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--keep", type=float, nargs="+", default=None)
    p.add_argument("--block", type=int, default=None)
    p.add_argument("--selection", choices=["topk", "window"], default="topk")
    p.add_argument("--providers", default="sdpa,rettn,flex,dense_lse",
                   help=f"comma-separated subset of {','.join(ALL_PROVIDERS)}")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per provider")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default="bench_results/bench_attention.json", help="JSON output path")
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda was asked for but torch sees no CUDA GPU")
    if args.preset is None:
        args.preset = "cogvideox" if args.device == "cuda" else "cpu"
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.repeats is None:
        args.repeats = 20 if args.device == "cuda" else 5
    providers = [x.strip() for x in args.providers.split(",") if x.strip()]
    bad = [x for x in providers if x not in ALL_PROVIDERS]
    if bad:
        p.error(f"unknown provider(s) {bad}; choose from {ALL_PROVIDERS}")
    args.providers = providers
    if any(not 0 < k <= 1 for k in args.keep):
        p.error("--keep values must be in (0, 1]")
    return args


def main(argv=None):
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    env = environment(device)
    print(f"rettn attention benchmark on {env['device_name']} ({device}, torch {env['torch']}, "
          f"triton {env['triton']}, {env['threads']} threads)")
    print(f"B={args.batch} H={args.heads} D={args.head_dim} {args.dtype} block={args.block} "
          f"selection={args.selection}; medians of {args.repeats} interleaved calls after "
          f"{args.warmup} warm-up rounds (flex compile time excluded)")
    rows = []
    for seq in args.seq:
        for keep in args.keep:
            rows.append(bench_one(args, seq, keep, args.providers, device, dtype))
            print(f"  done seq={seq} keep={keep}", file=sys.stderr)
    print_table(rows)
    targets = check_targets(args.preset, rows)
    if targets:
        for name, (value, bound, ok) in targets.items():
            print(f"target {name}: {value:.3f} (bound {bound}) -> {'met' if ok else 'NOT met'}")
    report = dict(env=env, command=" ".join([sys.executable] + sys.argv), args=vars(args),
                  rows=rows, targets=targets, date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
