"""Time ``selection.topk`` (block selection) at one shape, eagerly and, on CUDA, replayed from a
CUDA graph; on CUDA also check that a call synchronises nothing.

    python scripts/bench_selection.py                       # CPU, B=2 H=4 S=17776 D=64 bf16
    python scripts/bench_selection.py --device cuda --heads 30 --json sel.json   # CogVideoX-2B

q and k are (B, S, H, D) tensors seen as (B, H, S, D) (what attention processors pass; use
``--contiguous`` for (B, H, S, D) storage). The text span ``[(0, --text-len)]`` is kept dense.
Prints one line per variant: median milliseconds per call over ``--repeats`` timed runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rettn.ops import selection  # noqa: E402
from rettn.tools.profile.kernels import time_calls  # noqa: E402


def _timed(fn, device, repeats: int, inner: int) -> float:
    """Median ms per call of ``fn``: ``repeats`` windows of back-to-back calls (at most ``inner``
    each), timed by the profiler's :func:`~rettn.tools.profile.kernels.time_calls`."""
    return 1e3 * time_calls({"fn": fn}, device, repeats, warmup=0, max_calls=inner)["fn"]["median_s"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=17776)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--keep", type=float, default=0.03125)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--text-len", type=int, default=226, help="dense span [(0, text_len)]; 0: none")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--contiguous", action="store_true", help="(B, H, S, D) storage instead of a view")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--inner", type=int, default=None, help="at most N calls per timed window (default 20 CUDA, 3 CPU)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    inner = args.inner or (20 if device.type == "cuda" else 3)
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (args.batch, args.seq, args.heads, args.head_dim)

    def make():
        x = torch.randn(*shape, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
        return x.contiguous() if args.contiguous else x

    q, k = make(), make()
    spans = [(0, args.text_len)] if args.text_len else []

    def select():
        return selection.topk(q, k, args.keep, block_q=args.block, dense_spans=spans)

    layout = select()  # warm-up: fills the per-shape constant cache
    result = dict(batch=args.batch, heads=args.heads, seq=args.seq, head_dim=args.head_dim,
                  dtype=args.dtype, keep=args.keep, block=args.block, text_len=args.text_len,
                  device=str(device), strided=not args.contiguous, torch=torch.__version__,
                  max_kv=layout.max_kv)
    result["eager_ms"] = _timed(select, device, args.repeats, inner)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any synchronising call in topk raises here
        try:
            select()
            result["syncs"] = 0
        except RuntimeError as e:
            result["syncs"] = f"syncs: {e}"[:300]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            select()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = select()
        graph.replay()
        eager = select()
        result["graph_matches_eager"] = bool(torch.equal(captured.kv_indices, eager.kv_indices)
                                             and torch.equal(captured.kv_num_blocks, eager.kv_num_blocks))
        result["graph_ms"] = _timed(graph.replay, device, args.repeats, inner)

    for key in ("eager_ms", "graph_ms"):
        if key in result:
            print(f"topk {key[:-3]:<6} {result[key]:8.3f} ms  (B={args.batch} H={args.heads} S={args.seq} "
                  f"D={args.head_dim} {args.dtype} keep={args.keep} block={args.block} on {device})")
    for key in ("syncs", "graph_matches_eager"):
        if key in result:
            print(f"{key}: {result[key]}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
