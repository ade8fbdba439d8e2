"""The kernel table: dense SDPA, dense with lse, FlexAttention and rettn's sparse kernels timed at
a model's captured attention shape, over a sweep of keep ratios; and :func:`time_calls`."""

from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F

from rettn.errors import UsageError
from rettn.tools.profile.clocks import elapsed, mark, sync


def _quantile(xs: list, p: float) -> float:
    xs = sorted(xs)
    pos = p * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def time_calls(fns: dict, device, windows: int, warmup: int = 2, target_s: float = 0.02,
               max_calls: int = 200) -> dict:
    """Seconds per call of each function, timed as users run them: back-to-back calls with one
    pair of CUDA events (``time.perf_counter`` on CPU) around a window of ``calls`` calls, so the
    host work between calls overlaps the device work as in a real run. ``calls`` is chosen per
    function from one timed call after the warm-up, so that a window lasts about ``target_s``
    (``target_s <= 0``: one call per window);
    windows are interleaved round-robin across the functions so that noise hits all alike.

    Returns ``{name: {"median_s", "p20_s", "p80_s", "min_s", "calls", "windows"}}`` (per call).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()

    def window(fn, n):
        sync(device)
        a = mark(device)
        for _ in range(n):
            fn()
        b = mark(device)
        sync(device)
        return elapsed(a, b) / n

    if target_s > 0:
        calls = {name: max(1, min(max_calls, math.ceil(target_s / max(window(fn, 1), 1e-7))))
                 for name, fn in fns.items()}
    else:  # one call per window, no sizing call (rehearsals on slow interpreters)
        calls = dict.fromkeys(fns, 1)
    times = {name: [] for name in fns}
    for _ in range(max(1, windows)):
        for name, fn in fns.items():
            times[name].append(window(fn, calls[name]))
    return {name: {"median_s": statistics.median(t), "p20_s": _quantile(t, 0.2), "p80_s": _quantile(t, 0.8),
                   "min_s": min(t), "calls": calls[name], "windows": len(t)} for name, t in times.items()}


def _measure(fns: dict, device, repeats: int, warmup: int) -> dict:
    """Median seconds per call of each function (:func:`time_calls` with ``repeats`` windows)."""
    return {name: r["median_s"] for name, r in time_calls(fns, device, repeats, warmup).items()}


def _select(q, k, config, keep, info):
    """The engine's block selection for this call (see Engine._layout), at ``keep``."""
    from rettn.ops import selection

    bs = config.block_size
    spans = list(info.dense_spans) if (config.dense_conditioning and info is not None) else []
    if config.pattern == "topk":
        return selection.topk(q, k, keep, block_q=bs, dense_spans=spans)
    if config.pattern == "window":
        return selection.window(q.shape[2], keep, bs, dense_spans=spans, device=q.device)
    if info is None or info.grid is None:
        raise UsageError("pattern='frame_window' needs the token grid, which this call did not give")
    return selection.frame_window(info.grid, keep, bs, video_start=info.text_first, seq_len=q.shape[2],
                                  device=q.device)


def kernel_table(capture, config, providers, keeps, repeats: int, warmup: int | None = None, baseline=None,
                 on_row=None) -> dict:
    """Kernel timings at the captured attention shape: one row per keep ratio. ``sdpa`` runs on
    the dense baseline's backend (``baseline``: a :class:`~rettn.tools.profile.baseline.DenseBaseline`;
    None: PyTorch's own order); ``on_row(table)`` gets the table so far after each row (the
    profile rewrites its JSON there, so a run cut mid-table keeps its finished rows). ``warmup``:
    untimed calls per function before timing (default: 2, at most ``repeats``)."""
    import contextlib

    warmup = min(2, repeats) if warmup is None else warmup
    sdpa_context = baseline.context if baseline is not None else contextlib.nullcontext
    sdpa_name = baseline.name if baseline is not None else "PyTorch's default pick"
    from rettn.ops.attention import auto_backend, attention_with_lse, block_sparse_attention, sparse_attention_rescaled

    b, h, s, d = capture.shape
    device, dtype, scale = capture.device, capture.dtype, capture.scale
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    rho = torch.full((b, h, s), 0.9, device=device)
    residual = (0.01 * torch.randn(b, h, s, d, generator=g)).to(device=device, dtype=dtype)
    dense_fns = {}
    if "sdpa" in providers:
        def sdpa():
            with sdpa_context():
                return F.scaled_dot_product_attention(q, k, v, scale=scale)

        dense_fns["sdpa"] = sdpa
    if "dense_lse" in providers:
        dense_fns["dense_lse"] = lambda: attention_with_lse(q, k, v, scale=scale)
    rows, notes, dense_ms = [], [], None
    flex_ok = "flex" in providers
    table = {"shape": {"batch": b, "heads": h, "seq": s, "head_dim": d}, "dtype": str(dtype).replace("torch.", ""),
             "pattern": config.pattern, "block_size": config.block_size, "repeats": repeats, "warmup": warmup,
             "sdpa_backend": sdpa_name, "rows": rows, "notes": notes}
    for i, keep in enumerate(keeps):
        layout = _select(q, k, config, keep, capture.info)
        fns = {"selection": lambda keep=keep: _select(q, k, config, keep, capture.info)}
        if "rettn" in providers:
            fns["rettn"] = lambda layout=layout: block_sparse_attention(q, k, v, layout, scale=scale, backend=config.backend)
        if "rettn_rescaled" in providers:
            fns["rettn_rescaled"] = lambda layout=layout: sparse_attention_rescaled(
                q, k, v, layout, rho, residual, scale=scale, backend=config.backend)
        compile_s = None
        if flex_ok:
            try:
                t = time.perf_counter()
                block_sparse_attention(q, k, v, layout, scale=scale, backend="flex")  # compiles: excluded
                sync(device)
                compile_s = time.perf_counter() - t
                fns["flex"] = lambda layout=layout: block_sparse_attention(q, k, v, layout, scale=scale, backend="flex")
            except Exception as e:  # noqa: BLE001 - report, do not hide: flex may not run here
                flex_ok = False
                notes.append(f"FlexAttention unavailable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        if dense_ms is None:  # the dense providers do not depend on keep: timed once, interleaved
            fns.update(dense_fns)
        med = _measure(fns, device, repeats, warmup)
        ms = {name: 1e3 * sec for name, sec in med.items()}
        if dense_ms is None:
            dense_ms = {name: ms.pop(name) for name in dense_fns}
        ms.update(dense_ms)
        row = {"keep": keep, "density": layout.density(), "ms": ms, "flex_compile_s": compile_s,
               "backend": config.backend or auto_backend(q, layout), "sdpa_backend": sdpa_name}
        if "rettn" in ms and "sdpa" in ms:
            row["rettn_vs_sdpa"] = ms["sdpa"] / ms["rettn"]
        if "rettn" in ms and "flex" in ms:
            row["rettn_vs_flex"] = ms["flex"] / ms["rettn"]
        if "flex" in ms and "sdpa" in ms:
            row["flex_vs_sdpa"] = ms["sdpa"] / ms["flex"]
        rows.append(row)
        if on_row is not None:
            done = i + 1 == len(keeps)
            on_row(dict(table, rows=list(rows), notes=list(notes), **({} if done else {
                "partial": f"{i + 1} of {len(keeps)} keep ratios timed; the rest were still running"})))
    return table


def density_keeps(keep: float, sweep) -> list[float]:
    """The keep ratios of the kernel sweep: ``sweep`` if given, else keep/2, keep, 2 keep, 4 keep
    (within (0, 1]); the run's own keep always first."""
    values = list(sweep) if sweep is not None else [keep / 2, keep * 2, keep * 4]
    out = [keep]
    for v in values:
        v = min(1.0, v)
        if 0 < v and all(not math.isclose(v, o) for o in out):
            out.append(v)
    return out

