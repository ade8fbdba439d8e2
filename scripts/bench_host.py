#!/usr/bin/env python
"""Host (Python) time of one attention call, with the kernel launch mocked out.

What is timed, per call, on CPU tensors of a tiny shape (1 x 1 x 128 x 16 by default: the few
elementwise torch ops left on the host path then touch ~2K elements, so what they cost is their
dispatch; on a GPU each would be one kernel launch, whose host cost is of the same order):

- ``block_sparse_attention(q, k, v, layout, backend="triton")``: validation, backend resolution,
  the ``rettn::sparse_attention`` custom op's dispatch, the Triton wrapper's argument set-up;
- the same with ``return_lse=True``;
- ``sparse_attention_rescaled(q, k, v, layout, rho, R, backend="triton")``;
- the engine's sparse step (``Engine.attend`` at a sparse step, statistics already cached);
- ``block_sparse_attention(..., backend=None)`` through the measured choice with a stored Triton
  choice (what auto costs per call on CUDA; CPU auto is measured here only because the bench
  enables measurement for this row).

The Triton launch ``attn_fwd[grid](...)`` is replaced by a no-op, so nothing runs on a
device and the outputs are the buffers the wrapper allocated. ``TRITON_INTERPRET=1`` is set only
so that the triton backend accepts CPU tensors; the interpreter never runs (the launch is mocked).
A benchmark, not a test: numbers are medians over many calls on a shared machine.

    python scripts/bench_host.py                         # JSON to bench_results/bench_host.json
    python scripts/bench_host.py --label before --out bench_results/host-before.json
    python scripts/bench_host.py --profile               # also the top functions by own time
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before rettn's Triton module is imported

import argparse  # noqa: E402
import contextlib  # noqa: E402
import cProfile  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import pstats  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import rettn  # noqa: E402
from rettn.ops import selection  # noqa: E402
from rettn.ops.attention import sparse_attention_rescaled  # noqa: E402
from rettn.ops import _triton as triton_sparse  # noqa: E402

TARGET_US = 50.0


class _NoLaunch:
    """Stands in for the ``@triton.jit`` kernel: ``kernel[grid](*args, **kw)`` does nothing."""

    calls = 0

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        _NoLaunch.calls += 1


def _per_call_us(fn, calls: int, rounds: int) -> dict:
    """Median / p10 / p90 over ``rounds`` rounds of the mean time of ``calls`` back-to-back calls."""
    for _ in range(max(10, calls // 10)):
        fn()
    per = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        per.append((time.perf_counter() - t) / calls * 1e6)
    per.sort()
    return {"us_median": statistics.median(per), "us_min": per[0], "us_p10": per[len(per) // 10],
            "us_p90": per[(9 * len(per)) // 10], "calls": calls, "rounds": rounds}


def _engine_case(q, k, v, scale, keep, block):
    """An engine at a sparse step with cached statistics for one layer (built by a real cache
    step through the engine's own code)."""
    from rettn.core.engine import CallInfo, Engine

    cfg = rettn.RettnConfig(keep=keep, block_size=block, backend="triton", min_seq_len=1, warmup=0)
    eng = Engine(cfg, n_layers=1, family="bench")
    slot = eng.slot(0)
    info = CallInfo(layer=0, kind="self", slot=slot)
    eng.kind = "cache"
    eng.attend(q, k, v, scale, info)
    eng.kind = "sparse"
    pending = slot.pending

    def step():
        eng.attend(q, k, v, scale, info)
        if len(pending) > 256:  # what a flush does between forwards, without its sync
            pending.clear()

    return step


def _auto_case(q, k, v, layout, scale, stack):
    """``backend=None`` through the measured choice (a stored Triton choice: the per-call cost of
    the chooser's lookup), as on CUDA; None where rettn has no chooser (before it existed)."""
    try:
        from rettn.ops import _choice as choice
    except ImportError:
        return None
    tiles = f"triton:{layout.block_q}x{layout.block_k}"
    chooser = choice.BackendChooser(measure=True, timer=lambda fns, device: {n: 1.0 for n in fns},
                                    candidates=lambda op, q, layout, grad, full: ([tiles, "torch"], {}))

    stack.enter_context(choice.use_chooser(chooser))  # for the rest of the run (explicit backends ignore it)

    def call():
        return rettn.block_sparse_attention(q, k, v, layout, scale=scale)

    call()  # the measurement (the timer above says every candidate takes 1 s: the first wins)
    assert chooser.choices()[0]["choice"] == tiles, chooser.choices()
    return call


def _git(*args) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--keep", type=float, default=0.25)
    p.add_argument("--calls", type=int, default=500, help="calls per timed round")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--label", default=None, help="a name for this run in the JSON (e.g. before/after)")
    p.add_argument("--profile", action="store_true", help="print the top functions by own time")
    p.add_argument("--out", default="bench_results/bench_host.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    b, h, s, d = args.batch, args.heads, args.seq, args.head_dim
    q, k, v = (torch.randn(b, h, s, d, generator=g) for _ in range(3))
    scale = d ** -0.5
    layout = selection.topk(q, k, args.keep, block_q=args.block)
    rho = torch.full((b, h, s), 0.9)
    residual = 0.01 * torch.randn(b, h, s, d, generator=g)

    stack = contextlib.ExitStack()
    auto = _auto_case(q, k, v, layout, scale, stack)  # measures with the real kernel (the interpreter), once
    real_kernel = triton_sparse.attn_fwd
    triton_sparse.attn_fwd = _NoLaunch()
    try:
        cases = {
            "block_sparse_attention": lambda: rettn.block_sparse_attention(q, k, v, layout, scale=scale,
                                                                           backend="triton"),
            "block_sparse_attention+lse": lambda: rettn.block_sparse_attention(
                q, k, v, layout, scale=scale, return_lse=True, backend="triton"),
            "sparse_attention_rescaled": lambda: sparse_attention_rescaled(q, k, v, layout, rho, residual,
                                                                           scale=scale, backend="triton"),
            "engine_sparse_step": _engine_case(q, k, v, scale, args.keep, args.block),
        }
        if auto is not None:
            cases["block_sparse_attention(auto)"] = auto
        rows = []
        for name, fn in cases.items():
            before = _NoLaunch.calls
            fn()
            launches = _NoLaunch.calls - before
            row = {"name": name, "launches_per_call": launches, **_per_call_us(fn, args.calls, args.rounds)}
            row["within_target"] = row["us_median"] <= TARGET_US
            rows.append(row)
        profile_text = None
        if args.profile:
            prof = cProfile.Profile()
            fn = cases["engine_sparse_step"]
            prof.enable()
            for _ in range(2000):
                fn()
            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
            profile_text = buf.getvalue()
    finally:
        triton_sparse.attn_fwd = real_kernel
        stack.close()

    report = {
        "label": args.label,
        "commit": _git("rev-parse", "--short", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "env": {"python": platform.python_version(), "torch": torch.__version__,
                "triton": getattr(sys.modules.get("triton"), "__version__", None),
                "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "shape": {"batch": b, "heads": h, "seq": s, "head_dim": d, "block": args.block, "keep": args.keep,
                  "density": layout.density()},
        "target_us": TARGET_US,
        "mock": "triton_sparse.attn_fwd[grid](...) replaced by a no-op",
        "rows": rows,
    }
    print(f"host time per call, launch mocked ({b}x{h}x{s}x{d}, block {args.block}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)); target <= {TARGET_US:.0f} us")
    print(f"{'call':30s} {'median us':>10s} {'min':>8s} {'p10':>8s} {'p90':>8s} {'launches':>9s}")
    for r in rows:
        print(f"{r['name']:30s} {r['us_median']:10.1f} {r['us_min']:8.1f} {r['us_p10']:8.1f} {r['us_p90']:8.1f} "
              f"{r['launches_per_call']:9d}")
    if profile_text:
        print(profile_text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
