#!/usr/bin/env python
"""Attention benchmark: dense SDPA vs rettn block-sparse vs FlexAttention on the same layout.

Side by side in one run, on one machine: every provider is timed in the same process, with the
same inputs, as users run it: layouts and FlexAttention's BlockMask are built before the timed
region (their cost is a row of its own), each time is a window of back-to-back calls with one
pair of CUDA events around it (perf_counter on CPU), windows interleaved across providers, and
the median and 20/80% quantiles per call are reported. The layout is the one real calls have:
top-k blocks plus the text tokens' rows and columns kept dense (``--text-len``), and the density
reported is the counted one (``layout.density()``). Prints a table and writes JSON (device,
versions, exact command, rows).

    python scripts/bench_attention.py                      # CPU sweep (default)
    python scripts/bench_attention.py --preset cogvideox   # CogVideoX-2B shape (GPU)
    python scripts/bench_attention.py --seq 4096 --keep 0.0625 --block 64 --providers sdpa,rettn

Providers: ``sdpa`` (PyTorch's own choice), ``sdpa_flash`` / ``sdpa_cudnn`` (one SDPA backend
each, through ``torch.nn.attention.sdpa_kernel``), ``flex`` (compiled FlexAttention with a
prebuilt BlockMask; ``flex_mask``: building that mask), ``rettn`` (the sparse kernel),
``rettn_lse`` (with lse: a cache step's sparse pass), ``rettn_rescaled`` (rho * O + R: a sparse
step), ``dense_lse`` (``rettn.attention_with_lse``, the default path) and ``dense_lse_triton``
(rettn's Triton dense kernel); ``select`` (the block selection) is always timed.

A cache step's attention (dense output, rho and R in ``--dtype``, finite check), three ways:
``cache_fused`` (one Triton pass over every key block), ``cache_two_pass`` (the fastest dense
kernel with lse, then the statistics launch: the route before the one-pass kernel) and
``cache_auto`` (``cache_step_attention`` as users call it: on CUDA the chooser's faster of the
two, named in the row's ``cache_route``). Row keys ``cache_step_vs_dense`` (cache_auto / best
SDPA: the cache step's cost in dense steps' attention), ``cache_fused_vs_dense`` and
``cache_two_pass_vs_dense``; ``checks.cache_fused_vs_two_pass_max_abs_r`` compares their R.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import launch_log  # noqa: E402  (scripts/: records kernel launches when RETTN_LAUNCH_LOG is set)
import rettn  # noqa: E402
from rettn.ops import selection  # noqa: E402
from rettn.tools.profile.kernels import time_calls  # noqa: E402
from rettn.tools.profile.report import device_name, triton_version  # noqa: E402

_T0 = time.perf_counter()
PRESETS = {
    # The CI-sized CPU target of issue 2: sparse torch path >= 4x dense SDPA at keep 1/16.
    "cpu": dict(batch=1, heads=8, seq=[2048, 4096], head_dim=64, dtype="float32",
                keep=[0.25, 0.125, 0.0625], block=64, text_len=0),
    # CogVideoX-2B at 49 frames 720x480 with CFG: 17,776 tokens (226 text first), 30 heads.
    "cogvideox": dict(batch=2, heads=30, seq=[17776], head_dim=64, dtype="bfloat16",
                      keep=[0.03125, 0.0625], block=128, text_len=226),
    # gpu_check.sh --rehearse: the same code on CPU under the Triton interpreter, tiny shapes
    "rehearse": dict(batch=1, heads=1, seq=[304], head_dim=64, dtype="bfloat16",
                     keep=[0.03125, 0.0625], block=128, text_len=26),
}
TARGETS = {
    "cpu": dict(seq=4096, keep=0.0625, min_speedup_vs_sdpa=4.0, max_select_share=0.20),
    "cogvideox": dict(seq=17776, keep=0.03125, min_speedup_vs_sdpa=15.0, min_speedup_vs_flex=1.5,
                      max_dense_vs_sdpa=1.3, max_cache_step_vs_dense=1.05),
}
ALL_PROVIDERS = ("sdpa", "sdpa_flash", "sdpa_cudnn", "flex", "rettn", "rettn_lse", "rettn_rescaled",
                 "dense_lse", "dense_lse_triton", "cache_fused", "cache_two_pass", "cache_auto")
CACHE = ("cache_fused", "cache_two_pass", "cache_auto")
DENSE = ("sdpa", "sdpa_flash", "sdpa_cudnn")
OWN = ("rettn", "rettn_lse", "rettn_rescaled", "dense_lse", "dense_lse_triton") + CACHE  # a failure here fails the run
SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION"}


def _sdpa_with(backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def bench_one(args, seq, keep, device, dtype, flex_fn):
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (args.batch, args.heads, seq, args.head_dim)
    q, k, v = (torch.randn(*shape, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    spans = [(0, args.text_len)] if args.text_len else []
    scale = args.head_dim ** -0.5

    def select():
        if args.selection == "window":
            return selection.window(seq, keep, args.block, dense_spans=spans, device=device)
        return selection.topk(q, k, keep, block_q=args.block, dense_spans=spans)

    layout = select()
    rho = torch.full((args.batch, args.heads, seq), 0.9, device=device)
    residual = (0.01 * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype)
    backend = args.backend
    fns, errors, checks = {"select": select}, {}, {}
    wanted = args.providers

    def offer(name, fn):
        """Run once (a compile or a refusal shows here, not in the timing), then time it."""
        try:
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            fns[name] = fn
            print(f"  {name} ready at {time.perf_counter() - _T0:.1f} s", file=sys.stderr)  # where the time goes
            return out
        except Exception as e:  # noqa: BLE001 - reported per provider: e.g. cuDNN may refuse a shape
            errors[name] = _short(e)
            print(f"  {name} unavailable at seq={seq} keep={keep}: {errors[name]}", file=sys.stderr)
            return None

    if "sdpa" in wanted:
        offer("sdpa", lambda: F.scaled_dot_product_attention(q, k, v))
    for name, b in SDPA_BACKENDS.items():
        if name in wanted:
            run = _sdpa_with(b)
            offer(name, lambda run=run: run(q, k, v))
    rettn_out = None
    if "rettn" in wanted:
        rettn_out = offer("rettn", lambda: rettn.block_sparse_attention(q, k, v, layout, backend=backend))
    if "rettn_lse" in wanted:
        offer("rettn_lse", lambda: rettn.block_sparse_attention(q, k, v, layout, return_lse=True, backend=backend))
    if "rettn_rescaled" in wanted:
        offer("rettn_rescaled", lambda: rettn.ops.attention.sparse_attention_rescaled(
            q, k, v, layout, rho, residual, backend=backend))
    dense_out = None
    if "dense_lse" in wanted:
        dense_out = offer("dense_lse", lambda: rettn.attention_with_lse(q, k, v))
    if "dense_lse_triton" in wanted:
        offer("dense_lse_triton", lambda: rettn.attention_with_lse(q, k, v, backend="triton"))
    cache_out = {}
    for name, route in (("cache_fused", "fused"), ("cache_two_pass", "dense+stats"), ("cache_auto", backend)):
        if name in wanted:
            cache_out[name] = offer(name, lambda route=route: _cache_step(q, k, v, layout, scale, dtype, route))
    if cache_out.get("cache_fused") is not None and cache_out.get("cache_two_pass") is not None:
        r1, r2 = cache_out["cache_fused"][2], cache_out["cache_two_pass"][2]
        checks["cache_fused_vs_two_pass_max_abs_r"] = float((r1.float() - r2.float()).abs().max())
    cache_out.clear()
    compile_s = None
    if "flex" in wanted and flex_fn is not None:
        t = time.perf_counter()
        block_mask = offer("flex_mask", layout.to_block_mask)
        if block_mask is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # eager flex on CPU warns it is unfused
                flex_out = offer("flex", lambda: flex_fn(q, k, v, block_mask=block_mask, scale=scale))
            compile_s = time.perf_counter() - t  # the first call compiles: excluded from the timing
            if flex_out is not None and rettn_out is not None:
                checks["rettn_vs_flex_max_abs"] = float((rettn_out.float() - flex_out.float()).abs().max())
    if dense_out is not None and "sdpa" in fns:
        ref = F.scaled_dot_product_attention(q, k, v)
        checks["dense_lse_vs_sdpa_max_abs"] = float((dense_out[0].float() - ref.float()).abs().max())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        stats = time_calls(fns, device, args.repeats, args.warmup, target_s=args.window_ms / 1e3)
    from rettn.ops.attention import auto_backend

    row = dict(seq=seq, keep=keep, text_len=args.text_len, density=layout.density(),
               kv_blocks_per_row=float(layout.kv_num_blocks.float().mean()), num_k_blocks=layout.num_k_blocks,
               backend=backend or auto_backend(q, layout),
               ms={name: 1e3 * s["median_s"] for name, s in stats.items()},
               ms_p20_p80={name: [1e3 * s["p20_s"], 1e3 * s["p80_s"]] for name, s in stats.items()},
               calls_per_window={name: s["calls"] for name, s in stats.items()},
               errors=errors, checks=checks, flex_compile_s=compile_s)
    ms = row["ms"]
    dense = {name: ms[name] for name in DENSE if name in ms}
    if dense:
        best = min(dense, key=dense.get)
        row["best_sdpa"] = best
        ms_best = dense[best]
        if "rettn" in ms:
            row["speedup_vs_sdpa"] = ms_best / ms["rettn"]
            row["speedup_vs_sdpa_with_select"] = ms_best / (ms["rettn"] + ms["select"])
        if "rettn_rescaled" in ms:
            row["rescaled_speedup_vs_sdpa"] = ms_best / ms["rettn_rescaled"]
        if "dense_lse" in ms:
            row["dense_lse_vs_sdpa"] = ms["dense_lse"] / ms_best
        if "flex" in ms:
            row["flex_speedup_vs_sdpa"] = ms_best / ms["flex"]
        for name, key in (("cache_auto", "cache_step_vs_dense"), ("cache_fused", "cache_fused_vs_dense"),
                          ("cache_two_pass", "cache_two_pass_vs_dense")):
            if name in ms:
                row[key] = ms[name] / ms_best
    if "cache_auto" in ms:
        from rettn.ops._choice import default_chooser

        chosen = default_chooser().lookup("cache", q, k, layout)
        row["cache_route"] = "fused" if backend == "triton" else (chosen or "dense+stats")
    if "rettn" in ms:
        row["select_share"] = ms["select"] / ms["rettn"]
        if "flex" in ms:
            row["speedup_vs_flex"] = ms["flex"] / ms["rettn"]
    return row


def _cache_step(q, k, v, layout, scale, dtype, route):
    """One cache step's attention: ``(out_dense, rho, R, finite)``. ``route``: ``"fused"``,
    ``"dense+stats"`` (the two routes, named) or a public backend (None: auto)."""
    if route in ("fused", "dense+stats"):
        from rettn.ops._cache_pass import cache_pass_outputs

        return cache_pass_outputs(q, k, v, layout, scale, route, True, dtype, True)
    return rettn.ops.attention.cache_step_attention(q, k, v, layout, scale=scale, residual_dtype=dtype,
                                                    check_finite=True, backend=route)


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def print_table(rows):
    head = ("seq", "keep", "density", "sdpa", "flash", "cudnn", "flex", "flex mask", "rettn", "+lse",
            "rescaled", "dense_lse", "dense_lse triton", "select", "x best sdpa", "x flex", "sel/kern")
    print("ms per call | " + " | ".join(head))
    for r in rows:
        ms = r["ms"]
        print("            | " + " | ".join([
            str(r["seq"]), f"{r['keep']:.4f}", f"{r['density']:.4f}", fmt(ms.get("sdpa")), fmt(ms.get("sdpa_flash")),
            fmt(ms.get("sdpa_cudnn")), fmt(ms.get("flex")), fmt(ms.get("flex_mask")), fmt(ms.get("rettn")),
            fmt(ms.get("rettn_lse")), fmt(ms.get("rettn_rescaled")), fmt(ms.get("dense_lse")),
            fmt(ms.get("dense_lse_triton")), fmt(ms.get("select")), fmt(r.get("speedup_vs_sdpa")),
            fmt(r.get("speedup_vs_flex")), fmt(r.get("select_share"), ".1%"),
        ]))
        if r["errors"]:
            print(f"            |   unavailable: {r['errors']}")
        if r["checks"]:
            print("            |   checks: " + ", ".join(f"{k} {v:.3g}" for k, v in r["checks"].items()))
        if any(name in ms for name in CACHE):
            print(f"            |   cache step ms: fused {fmt(ms.get('cache_fused'))}, two passes "
                  f"{fmt(ms.get('cache_two_pass'))}, auto {fmt(ms.get('cache_auto'))} ({r.get('cache_route')}) = "
                  f"{fmt(r.get('cache_step_vs_dense'), '.3f')} x best dense {r.get('best_sdpa')} (fused "
                  f"{fmt(r.get('cache_fused_vs_dense'), '.3f')}, two passes "
                  f"{fmt(r.get('cache_two_pass_vs_dense'), '.3f')})")


def check_targets(preset, rows):
    target = TARGETS.get(preset)
    if not target:
        return None
    row = next((r for r in rows if r["seq"] == target["seq"] and math.isclose(r["keep"], target["keep"])), None)
    if row is None:
        return None
    result = {}
    for key, field, low in (("min_speedup_vs_sdpa", "speedup_vs_sdpa", True),
                            ("max_select_share", "select_share", False),
                            ("min_speedup_vs_flex", "speedup_vs_flex", True),
                            ("max_dense_vs_sdpa", "dense_lse_vs_sdpa", False),
                            ("max_cache_step_vs_dense", "cache_step_vs_dense", False)):
        if key in target and field in row:
            value, bound = row[field], target[key]
            result[field] = (value, bound, value >= bound if low else value <= bound)
    return result


def environment(device):
    env = dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
               threads=torch.get_num_threads(), device=str(device))
    env["triton"] = triton_version()
    env["device_name"] = device_name(device)
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
    p.add_argument("--text-len", type=int, default=None,
                   help="text tokens first in the sequence, their rows and columns kept dense (the real layout)")
    p.add_argument("--selection", choices=["topk", "window"], default="topk")
    p.add_argument("--providers", default=None,
                   help=f"comma-separated subset of {','.join(ALL_PROVIDERS)} (default: all that this machine "
                        "has: on CPU no cuDNN, and rettn's Triton dense kernel only under TRITON_INTERPRET=1)")
    p.add_argument("--backend", choices=["triton", "torch", "flex"], default=None,
                   help="rettn's backend for the rettn rows (default: auto, as users get it)")
    p.add_argument("--flex-compile-backend", default="inductor",
                   help="torch.compile backend for FlexAttention (aot_eager: no code generation, for rehearsals)")
    p.add_argument("--repeats", type=int, default=None, help="timed windows per provider")
    p.add_argument("--window-ms", type=float, default=20.0,
                   help="about how long one window of back-to-back calls lasts (0: one call per window)")
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
        args.repeats = 10 if args.device == "cuda" else 5
    if args.providers is None:
        skip = set() if args.device == "cuda" else {"sdpa_cudnn"} | (
            set() if os.environ.get("TRITON_INTERPRET") == "1" else {"dense_lse_triton", "cache_fused"})
        args.providers = ",".join(x for x in ALL_PROVIDERS if x not in skip)
    providers = [x.strip() for x in args.providers.split(",") if x.strip()]
    bad = [x for x in providers if x not in ALL_PROVIDERS]
    if bad:
        p.error(f"unknown provider(s) {bad}; choose from {ALL_PROVIDERS}")
    args.providers = providers
    if any(not 0 < k <= 1 for k in args.keep):
        p.error("--keep values must be in (0, 1]")
    if not 0 <= args.text_len < min(args.seq):
        p.error(f"--text-len must be in [0, {min(args.seq)}) (shorter than the sequence)")
    return args


def _flex(args):
    if "flex" not in args.providers:
        return None
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as e:  # pragma: no cover - torch >= 2.5 has it
        print(f"  flex unavailable: {_short(e)}", file=sys.stderr)
        return None
    return torch.compile(flex_attention, dynamic=False, backend=args.flex_compile_backend)


def main(argv=None):
    launch_log.install_from_env()
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    env = environment(device)
    print(f"rettn attention benchmark on {env['device_name']} ({device}, torch {env['torch']}, "
          f"triton {env['triton']}, {env['threads']} threads)")
    print(f"B={args.batch} H={args.heads} D={args.head_dim} {args.dtype} block={args.block} "
          f"selection={args.selection} text={args.text_len} (dense rows and columns); per call: medians of "
          f"{args.repeats} interleaved windows of ~{args.window_ms:g} ms of back-to-back calls, after "
          f"{args.warmup} warm-up rounds (first calls, compiles and mask building outside the timing)")
    flex_fn = _flex(args)
    rows = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = dict(env=env, command=" ".join([sys.executable] + sys.argv), args=vars(args), rows=rows,
                  targets=None, date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    for seq in args.seq:
        for keep in args.keep:
            rows.append(bench_one(args, seq, keep, device, dtype, flex_fn))
            print(f"  done seq={seq} keep={keep}", file=sys.stderr)
            out.write_text(json.dumps(report, indent=2, default=str))  # each row saved as soon as it exists
    print_table(rows)
    targets = check_targets(args.preset, rows)
    if targets:
        for name, (value, bound, ok) in targets.items():
            print(f"target {name}: {value:.3f} (bound {bound}) -> {'met' if ok else 'NOT met'}")
    report["targets"] = targets
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out}")
    return report


def failed_own(report) -> list[str]:
    """rettn's own providers that did not run (other libraries' refusals are only reported)."""
    return sorted({name for r in report["rows"] for name in r["errors"] if name in OWN})


if __name__ == "__main__":
    bad = failed_own(main())
    if bad:
        sys.exit(f"rettn's own kernels failed: {', '.join(bad)} (see the errors above)")
