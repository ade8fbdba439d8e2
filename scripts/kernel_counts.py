#!/usr/bin/env python
"""Count-based checks of rettn's kernels at the CogVideoX-2B shape, without a GPU.

1. Load balance: the simulated makespan of the sparse kernel's grid on an H200 (132 SMs, one
   128 x 64 program per SM) with the real CogVideoX-2B layout (B=2 CFG, H=30, 17,776 tokens, 226
   text tokens first and kept dense, block 128, top-k keep 3.125%), in the old launch order
   (query tiles in order within each (batch, head)) and heaviest first (what the kernel does).
   A program's cost is its number of key tiles plus one for its prologue and epilogue; the
   block scheduler gives each program, in launch order, to the first SM that is free.
2. Kernels launched and bytes moved per attention call: a dense step (the model's SDPA), a cache
   step and a sparse step, old route (separate passes and torch elementwise ops, as before the
   fused epilogues) against the fused route (the cache step also as its two-pass route: dense
   pass with lse, then the statistics launch), counted on meta tensors: every aten/rettn op that
   computes is one kernel; its bytes are each input and output read or written once (compulsory
   traffic: L2 reuse of K/V across query tiles is not counted), and a roofline estimate per
   kernel, max(FLOPs / 60% of 790 TFLOP/s, bytes / 4.3 TB/s) + 3 us launch (an estimate, not a
   measurement; the sparse kernels are assumed as efficient as the dense flash pass).

3. With ``--host``: host microseconds per call with the kernel launch mocked (a benchmark).

    python scripts/kernel_counts.py [--host] [--json counts.json]
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import math
import sys
from pathlib import Path
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rettn  # noqa: E402
from rettn.ops import attention as att  # noqa: E402
from rettn.ops import selection  # noqa: E402
from rettn.ops import _dispatch as dispatch  # noqa: E402
from rettn.ops import _triton as triton_sparse  # noqa: E402
from rettn.ops import _triton_cache as triton_cache  # noqa: E402
from rettn.ops.reference import RHO_FLOOR  # noqa: E402

COGVIDEOX_2B = dict(batch=2, heads=30, seq=17776, text=226, block=128, keep=0.03125, head_dim=64)
H200_SMS = 132


# ---------------------------------------------------------------------------------- load balance
def cogvideox_layout(batch=2, heads=30, seq=17776, text=226, block=128, keep=0.03125, seed=0, **_):
    """Top-k layout at the CogVideoX-2B shape with the text tokens' rows and columns dense
    (random Q/K: the counts per row are what matter here, and top-k keeps exactly its count)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq, 8, generator=g)
    k = torch.randn(batch, heads, seq, 8, generator=g)
    return selection.topk(q, k, keep, block_q=block, dense_spans=[(0, text)])


def makespan(costs, workers: int) -> float:
    """Finish time of ``costs`` (in launch order) on ``workers`` identical slots, each program
    going to the first slot that frees up (the GPU's block scheduler)."""
    free = [0.0] * workers
    heapq.heapify(free)
    end = 0.0
    for c in costs:
        t = heapq.heappop(free) + c
        end = max(end, t)
        heapq.heappush(free, t)
    return end


def program_costs(layout, b, h, block_m=128, block_n=64, overhead=1.0, ordered=True):
    """Cost of each program of the sparse kernel's grid, in launch order."""
    n_tiles = math.ceil(layout.seq_q / block_m)
    per_row = layout.block_q // block_m
    sub = layout.block_k // block_n
    counts = layout.kv_num_blocks.expand(b, h, -1).repeat_interleave(per_row, dim=2)[..., :n_tiles]
    cost = (counts.reshape(-1).double() * sub + overhead)
    if ordered:
        cost = cost[triton_sparse.launch_order(layout, b, h, n_tiles, block_m).long()]
    return cost.tolist()


def load_balance(layout=None, workers=H200_SMS, **shape) -> dict:
    shape = {**COGVIDEOX_2B, **shape}
    layout = cogvideox_layout(**shape) if layout is None else layout
    b, h = shape["batch"], shape["heads"]
    before = program_costs(layout, b, h, ordered=False)
    after = program_costs(layout, b, h, ordered=True)
    ideal = max(sum(before) / workers, max(before))
    counts = layout.kv_num_blocks
    return {
        "workers": workers,
        "programs": len(before),
        "counted_density": layout.density(),
        "heaviest_over_median_cost": max(before) / sorted(before)[len(before) // 2],
        "dense_rows_per_head": int((counts == layout.num_k_blocks).sum()) // max(1, counts.shape[0] * counts.shape[1]),
        "ideal": ideal,
        "before": makespan(before, workers) / ideal,
        "after": makespan(after, workers) / ideal,
    }


# ---------------------------------------------------------------------------------- kernel counts
_FREE = {  # ops that launch no kernel (views, metadata, allocation)
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "view", "_unsafe_view", "expand",
    "t", "transpose", "permute", "as_strided", "slice", "select", "unsqueeze", "squeeze", "alias", "detach",
    "lift_fresh", "_reshape_alias", "reshape", "unbind", "split", "diagonal", "sym_size", "sym_stride",
    "sym_numel", "sym_storage_offset", "is_same_size", "_local_scalar_dense",
}


def _bytes(t) -> int:
    if not isinstance(t, torch.Tensor):
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _flat(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _flat(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _flat(y)


H200_FLOPS = 0.6 * 790e12  # bf16 matmul at 60% of the measured peak (KERNELS.md)
H200_BYTES = 4.3e12  # device copies, measured
LAUNCH_S = 3e-6  # per kernel


def _attention_flops(q, k, density=1.0) -> float:
    b, h, sq, d = q.shape
    return 4.0 * b * h * sq * k.shape[2] * d * density


def _unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += _bytes(t)
    return total


class Counter(TorchDispatchMode):
    """Counts the kernels (ops that compute, and rettn's Triton launches), their compulsory
    bytes, and the attention FLOPs (``density`` for rettn's sparse kernels)."""

    active = None

    def __init__(self, density: float):
        super().__init__()
        self.density = density
        self.kernels: list[tuple[str, int, float]] = []

    def __enter__(self):
        Counter.active = self
        return super().__enter__()

    def __exit__(self, *exc):
        Counter.active = None
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if name not in _FREE:
            total = _unique_bytes(list(_flat(args)) + list(_flat(kwargs or {})) + list(_flat(out)))
            flops = 0.0
            if "flash_attention" in name:
                flops = _attention_flops(args[0], args[1])
            elif func.namespace == "rettn":
                flops = _attention_flops(args[0], args[1], self.density)
            self.kernels.append((str(func), total, flops))
        return out

    def launch(self, launch: triton_sparse.Launch):
        """A Triton launch (not run: meta tensors): its tensor arguments read or written once."""
        q, k = launch.args[0], launch.args[1]
        tensors = [a for a in launch.args if isinstance(a, torch.Tensor)]
        if launch.kernel is not None:  # the one-pass cache step: every key block
            self.kernels.append(("triton cache_fwd (one pass)", _unique_bytes(tensors), _attention_flops(q, k, 1.0)))
            return
        dense = launch.constexprs["DENSE"]
        self.kernels.append((f"triton _attn_fwd MODE={launch.constexprs['MODE']}", _unique_bytes(tensors),
                             _attention_flops(q, k, 1.0 if dense else self.density)))

    @property
    def summary(self) -> dict:
        est = sum(max(f / H200_FLOPS, b / H200_BYTES) + LAUNCH_S for _, b, f in self.kernels)
        return {"kernels": len(self.kernels), "bytes": sum(b for _, b, _ in self.kernels),
                "flops": sum(f for _, _, f in self.kernels), "estimate_s": est,
                "ops": [k for k, _, _ in self.kernels]}


def _dense_flash(q, k, v, scale=None, backend=None):
    """The dense pass as it runs on CUDA for 16-bit inputs: one flash kernel returning the lse."""
    res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
    return res[0], res[1]


@contextlib.contextmanager
def _as_on_gpu():
    """Meta tensors routed as CUDA ones would be (Triton backend, flash dense pass, sm_90 tiles)."""
    with mock.patch.object(triton_sparse, "unsupported_reason", lambda q, layout: None), \
            mock.patch.object(triton_sparse, "device_capability", lambda device: (9, 0)), \
            mock.patch.object(triton_sparse.Launch, "run", lambda self: Counter.active.launch(self)), \
            mock.patch.object(att, "attention_with_lse", _dense_flash):
        yield


def _old_cache_step(q, k, v, layout, scale, rdt):
    """The cache step before the fused epilogue (rettn 2026-12-02): dense pass, sparse pass with
    lse, then rho and R in torch."""
    out_d, lse_d = att.attention_with_lse(q, k, v, scale=scale)
    out_s, lse_s = rettn.block_sparse_attention(q, k, v, layout, scale=scale, return_lse=True, backend="triton")
    rho = torch.exp(lse_s - lse_d).clamp_(RHO_FLOOR, 1.0)
    r = out_d.float() - rho.unsqueeze(-1) * out_s.float()
    residual = r.to(device=q.device, dtype=rdt)
    ok = torch.isfinite(out_d).all()
    return out_d, rho, residual, ok


def _two_pass_cache_step(q, k, v, layout, scale, rdt):
    """The cache step's two-pass route (rettn 2026-12-04): the dense pass with lse, then one
    sparse launch with rho and R in its epilogue."""
    out_d, lse_d = att.attention_with_lse(q, k, v, scale=scale)
    rho, residual, ok = dispatch.run_cache_step(q, k, v, layout, scale, "triton", out_d, lse_d, True, rdt, True)
    return out_d, rho, residual, ok


def _old_sparse_step(q, k, v, layout, scale, rho_c, residual, ramp=0.04):
    rho = rho_c.to(q.device)
    rho_c = rho_c + ramp
    rho = rho.clamp(RHO_FLOOR, 1.0)
    residual = residual.to(q.device, non_blocking=True)
    out = att.sparse_attention_rescaled(q, k, v, layout, rho, residual, scale=scale, backend="triton")
    return out, torch.isfinite(out).all()


def step_counts(batch=2, heads=30, seq=17776, head_dim=64, block=128, dtype=torch.bfloat16, density=0.0635,
                **_) -> dict:
    """Kernels, compulsory bytes, FLOPs and a roofline time estimate per attention call (meta
    tensors; ``density``: the layout's counted density, 0.0635 for CogVideoX-2B at 3.125%)."""
    meta = torch.device("meta")
    q, k, v = (torch.empty(batch, seq, heads, head_dim, dtype=dtype, device=meta).transpose(1, 2) for _ in range(3))
    nq = math.ceil(seq / block)
    layout = rettn.BlockSparseLayout(torch.empty(batch, heads, nq, dtype=torch.int32, device=meta),
                                     torch.empty(batch, heads, nq, 8, dtype=torch.int32, device=meta),
                                     block, block, seq, seq, validate=False)
    scale = head_dim ** -0.5
    rho = torch.empty(batch, heads, seq, device=meta)
    residual = torch.empty_like(q)
    runs = {
        "dense step": lambda: _dense_flash(q, k, v, scale),
        "cache step, old": lambda: _old_cache_step(q, k, v, layout, scale, dtype),
        "cache step, two passes": lambda: _two_pass_cache_step(q, k, v, layout, scale, dtype),
        "cache step, fused": lambda: att.cache_step_attention(q, k, v, layout, scale=scale, residual_dtype=dtype,
                                                              check_finite=True, backend="triton"),
        "sparse step, old": lambda: _old_sparse_step(q, k, v, layout, scale, rho, residual),
        "sparse step, fused": lambda: att.sparse_step_attention(q, k, v, layout, rho, residual, scale=scale,
                                                                ramp=0.04, clamp_rho=True, check_finite=True,
                                                                backend="triton"),
    }
    out = {}
    with _as_on_gpu():
        # once per layout / per stream, not per call: a static layout's launch order, the flag's scratch
        triton_sparse.launch_order(layout, batch, heads, math.ceil(seq / block), block)
        triton_sparse.flag_scratch(meta)
        triton_cache.sweep_order(layout)  # the one-pass kernel's block order: once per layout
        for name, fn in runs.items():
            with Counter(density) as c:
                fn()
            out[name] = c.summary
    dense = out["dense step"]
    for r in out.values():
        r["bytes_vs_dense_step"] = r["bytes"] / dense["bytes"]
        r["estimate_vs_dense_step"] = r["estimate_s"] / dense["estimate_s"]
    return out


def host_time(calls: int = 2000, seq: int = 512, heads: int = 4) -> dict:
    """Host microseconds per sparse-step call with the kernel launch mocked (the launch itself,
    Triton's binder and C launcher, excluded): the public function and the engine's sparse step,
    Triton backend, CPU tensors under the interpreter's device rules."""
    import os
    import time

    os.environ.setdefault("TRITON_INTERPRET", "1")  # lets the triton backend take CPU tensors
    from rettn.core.config import RettnConfig
    from rettn.core.engine import CallInfo, Engine

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, seq, heads, 64, generator=g).transpose(1, 2) for _ in range(3))
    layout = selection.topk(q, k, 0.25, block_q=128, dense_spans=[(0, 100)])
    rho = torch.rand(1, heads, seq)
    residual = torch.randn_like(q)
    eng = Engine(RettnConfig(keep=0.25, block_size=128, warmup=0, refresh_interval=10 ** 6, min_seq_len=0,
                             backend="triton", ramp=0.04), n_layers=1, family="test")
    out = {}
    with mock.patch.object(triton_sparse.Launch, "run", lambda self: None):
        eng.on_forward(999.0)
        eng.attend(q, k, v, 0.125, CallInfo(layer=0))  # the cache step
        eng.slots[0].pending.clear()  # its flag was never written (no launch)
        eng.on_forward(998.0)
        runs = {
            "sparse_step_attention": lambda: att.sparse_step_attention(q, k, v, layout, rho, residual, ramp=0.04,
                                                                       check_finite=True, backend="triton"),
            "engine sparse step (Engine.attend)": lambda: eng.attend(q, k, v, 0.125, CallInfo(layer=0)),
        }
        for name, fn in runs.items():
            for _ in range(20):
                fn()
            if name.startswith("engine"):
                eng.slots[0].pending.clear()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            out[name] = (time.perf_counter() - start) / calls * 1e6
            eng.slots[0].pending.clear()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--host", action="store_true", help="also time the host work per call (launch mocked)")
    args = ap.parse_args(argv)
    lb = load_balance()
    print(f"load balance, CogVideoX-2B top-k keep 3.125% + 226 dense text tokens, block 128, {lb['programs']} programs "
          f"on {lb['workers']} SMs: counted density {lb['counted_density']:.4f}, heaviest program "
          f"{lb['heaviest_over_median_cost']:.1f}x the median")
    print(f"  simulated makespan / ideal: launch order {lb['before']:.3f}, heaviest first {lb['after']:.3f}")
    counts = step_counts(**COGVIDEOX_2B, density=lb["counted_density"])
    print("per attention call at B=2 H=30 S=17,776 D=64 bf16 (compulsory bytes; roofline estimate, not measured):")
    print(f"  {'call':20s} {'kernels':>7s} {'MB':>9s} {'x dense':>8s} {'est. ms':>8s} {'x dense':>8s}")
    for name, r in counts.items():
        print(f"  {name:20s} {r['kernels']:7d} {r['bytes'] / 1e6:9.1f} {r['bytes_vs_dense_step']:8.2f} "
              f"{r['estimate_s'] * 1e3:8.3f} {r['estimate_vs_dense_step']:8.3f}")
    host = host_time() if args.host else None
    if host:
        print("host work per call, launch mocked (us):")
        for name, us in host.items():
            print(f"  {name:45s} {us:8.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"load_balance": lb, "calls": counts, "host_us": host}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
