"""Latency profiler: where the time of a denoising run goes, dense vs with rettn.

    rettn profile                                              # embedded tiny model, CPU or GPU
    rettn profile --random-weights --arch cogvideox-2b         # the real transformer, random weights
    rettn profile --random-weights --arch cogvideox-5b --layers 2 --frames 9 --height 96 --width 96
    python scripts/profile_latency.py ...                      # the same code and options

What it measures (warm-up runs are excluded, and the report says how many):

- per denoising step, the transformer's wall time (CUDA events on GPU, ``time.perf_counter`` on
  CPU, from forward pre/post hooks on the transformer; a step is all its transformer calls), split
  into the regions rettn's engine times (:class:`rettn.core.engine.RegionTimer`): ``attention`` (every
  attention kernel of the patched layers, the model's own SDPA at dense steps included),
  ``selection`` (block selection), ``bookkeeping`` (rho, R, ramp, residual moves), and ``other``
  (the step time minus those: projections, MLPs, norms, RoPE, unpatched attention);
- means per step kind: dense steps without rettn (the baseline), and the dense, cache and sparse
  steps of the rettn run;
- the whole run, dense vs rettn, the speedup, and the schedule's ceiling: the rettn run's time if
  sparse steps' attention cost nothing;
- kernel level, at the model's real attention shape (captured from the run): dense SDPA, dense
  attention with lse (a cache step's extra), FlexAttention on the same layout, rettn's sparse
  kernel and its rescaled sparse-step form, block selection, and the density achieved, over a
  sweep of keep ratios.

Output: a table on screen, a JSON report (device, versions, exact command, every step of every
timed run) and a PNG chart (stacked time per step kind; speedup against density).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from rettn.core.engine import Observer, RegionTimer, StepTracker
from rettn.ops._choice import backend_choices

EXIT_USAGE = 2
REGIONS = ("attention", "selection", "bookkeeping")
KINDS = ("dense", "cache", "sparse")
EMBEDDED = "embedded"
EMBEDDED_PRESET = "tiny-shapes"
EMBEDDED_PROMPT = "a red circle moving right"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
KERNEL_PROVIDERS = ("sdpa", "dense_lse", "rettn", "rettn_rescaled", "flex")
SPARSITY_FLAGS = ("keep", "pattern", "block_size", "warmup", "refresh_interval", "dense_final",
                  "min_seq_len", "backend", "reselect")


class ProfileError(ValueError):
    """Bad input: printed as one line, exit code 2."""


# ============================================================================== clocks
def _mark(device: torch.device):
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _elapsed(start, end) -> float:
    if isinstance(start, float):
        return end - start
    return start.elapsed_time(end) / 1e3


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepRegionTimer(RegionTimer):
    """A :class:`RegionTimer` that also keys every region by the denoising step it ran in (the
    step index comes from :class:`StepClock`). CUDA events are resolved, with one sync, on read."""

    def __init__(self):
        super().__init__()
        self.step = -1
        self.marks: list = []  # (step, kind, region, start, end), resolved on read
        self.by_step: dict = {}  # {step: {region: seconds}}

    @contextlib.contextmanager
    def region(self, kind: str, name: str, device: torch.device):
        step, start = self.step, _mark(device)
        try:
            yield
        finally:
            self.marks.append((step, kind, name, start, _mark(device)))

    def _resolve(self):
        if any(not isinstance(m[3], float) for m in self.marks):
            torch.cuda.synchronize()
        resolved = [(step, kind, name, _elapsed(a, b)) for step, kind, name, a, b in self.marks]
        self.marks = []
        for _, kind, name, s in resolved:
            self.add(kind, name, s)
        for step, _, name, s in resolved:
            regions = self.by_step.setdefault(step, dict.fromkeys(REGIONS, 0.0))
            regions[name] = regions.get(name, 0.0) + s

    def per_step(self) -> dict:
        """{step: {region: seconds}}"""
        self._resolve()
        return {step: dict(regions) for step, regions in self.by_step.items()}

    def totals(self) -> dict:
        self._resolve()
        return dict(self.seconds)


def _timestep_of(signature, args, kwargs) -> float:
    try:
        bound = signature.bind_partial(*args, **kwargs).arguments
    except TypeError:
        bound = dict(kwargs)
    t = bound.get("timestep")
    if t is None:
        raise ProfileError("the transformer was called without a `timestep`; the profiler needs it to count steps")
    return float(t.float().max()) if isinstance(t, torch.Tensor) else float(t)


class StepClock:
    """Forward pre/post hooks on a transformer: the wall time of each denoising step (the sum of
    its transformer calls: Wan calls it twice per step with CFG). Steps are told apart from the
    timestep the way rettn's engine does (equal: same step; lower: next step)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, timer: StepRegionTimer | None = None):
        self.device, self.timer = device, timer
        self.tracker = StepTracker()
        self.signature = inspect.signature(model.forward)
        self.calls: list = []  # (step, start, end)
        self._start = None
        self._hooks = [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                       model.register_forward_hook(self._post)]

    def _pre(self, module, args, kwargs):
        self.tracker.on_forward(_timestep_of(self.signature, args, kwargs))
        if self.timer is not None:
            self.timer.step = self.tracker.step
        self._start = _mark(self.device)

    def _post(self, module, args, output):
        self.calls.append((self.tracker.step, self._start, _mark(self.device)))

    def remove(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def steps(self) -> dict:
        """{step: (seconds, calls)}, in step order."""
        _sync(self.device)
        out: dict = {}
        for step, a, b in self.calls:
            s, n = out.get(step, (0.0, 0))
            out[step] = (s + _elapsed(a, b), n + 1)
        return dict(sorted(out.items()))


# ============================================================================== records
@dataclass
class StepRecord:
    step: int
    kind: str
    seconds: float
    calls: int
    regions: dict = field(default_factory=dict)  # attention / selection / bookkeeping seconds

    @property
    def other(self) -> float:
        return self.seconds - sum(self.regions.values())


@dataclass
class RunRecord:
    mode: str  # "dense" (no rettn) or "rettn"
    total_s: float  # wall time of the whole run (pipeline call or transformer loop)
    steps: list
    peak_memory_bytes: int | None = None
    density: float | None = None
    counts: dict | None = None

    @property
    def transformer_s(self) -> float:
        return sum(s.seconds for s in self.steps)

    def to_json(self) -> dict:
        return {"mode": self.mode, "total_s": self.total_s, "transformer_s": self.transformer_s,
                "outside_transformer_s": self.total_s - self.transformer_s,
                "peak_memory_bytes": self.peak_memory_bytes, "mean_density": self.density,
                "counts": self.counts,
                "steps": [dict(asdict(s), other=s.other) for s in self.steps]}


# ============================================================================== runners
class TransformerRunner:
    """Runs a bare transformer over a schedule of timesteps, as a pipeline's denoising loop would
    call it (same inputs each step; only the timestep changes; ``calls_per_step`` calls per step)."""

    def __init__(self, model, family: str, inputs: dict, calls_per_step: int = 1, t_max: float = 999.0):
        self.model = self.target = self.transformer = model
        self.family, self.inputs, self.calls_per_step, self.t_max = family, inputs, calls_per_step, t_max

    def timesteps(self, num_steps: int) -> list[float]:
        return [float(round(self.t_max * (1 - i / num_steps))) for i in range(num_steps)]

    def run(self, num_steps: int, seed: int = 0):
        from rettn.tools.profile.dummy_inputs import set_timestep

        with torch.no_grad():
            for t in self.timesteps(num_steps):
                set_timestep(self.inputs, self.family, t)
                for _ in range(self.calls_per_step):
                    self.model(**self.inputs)


class PipelineRunner:
    """Runs a diffusers pipeline end to end (text encoding, denoising loop, decoding)."""

    def __init__(self, pipe, call_kwargs: dict):
        self.pipe, self.target, self.transformer = pipe, pipe, pipe.transformer
        self.call_kwargs = call_kwargs

    def run(self, num_steps: int, seed: int = 0):
        kwargs = dict(self.call_kwargs, num_inference_steps=num_steps,
                      generator=torch.Generator(device="cpu").manual_seed(seed))
        self.pipe(**kwargs)


@dataclass
class Capture(Observer):
    """The first sparse-eligible self-attention call of the longest sequence seen (an engine
    observer: ``engine.observe(capture)``)."""

    shape: tuple | None = None
    dtype: torch.dtype | None = None
    device: torch.device | None = None
    scale: float | None = None
    info: object = None

    def on_call(self, q, k, v, scale, info):
        if info.kind == "self" and (self.shape is None or q.shape[2] > self.shape[2]):
            self.shape, self.dtype, self.device = tuple(q.shape), q.dtype, q.device
            self.scale, self.info = scale, info


def timed_run(runner, num_steps: int, device: torch.device, config=None, capture: Capture | None = None,
              seed: int = 0) -> RunRecord:
    """One generation of ``num_steps`` steps, dense (``config=None``) or with rettn."""
    from rettn.diffusers.integration import apply_rettention

    timer = StepRegionTimer() if config is not None else None
    clock = StepClock(runner.transformer, device, timer)  # before rettn's hook: its work is timed
    handle = None
    try:
        if config is not None:
            handle = apply_rettention(runner.target, config.replace(num_inference_steps=num_steps))
            handle.engine.observe(timer)
            if capture is not None:
                handle.engine.observe(capture)  # this engine only; gone with the handle
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        t0 = time.perf_counter()
        runner.run(num_steps, seed)
        _sync(device)
        total = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        step_times = clock.steps()
        stats = handle.stats() if handle is not None else None
        regions = timer.per_step() if timer is not None else {}
    finally:
        if handle is not None:
            handle.remove()
        clock.remove()
    kinds = stats.kinds() if stats is not None else []
    steps = []
    for step, (seconds, calls) in step_times.items():
        kind = kinds[step] if step < len(kinds) else "dense"
        reg = {name: regions.get(step, {}).get(name, 0.0) for name in REGIONS} if timer is not None else {}
        steps.append(StepRecord(step, kind, seconds, calls, reg))
    return RunRecord("rettn" if config is not None else "dense", total, steps, peak,
                     stats.mean_density() if stats is not None else None,
                     stats.counts() if stats is not None else None)


# ============================================================================== summary
def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def summarize(dense_runs: list, rettn_runs: list) -> dict:
    """Per step kind means, whole-run times, speedups and the schedule's ceiling."""
    rows = []
    base = [s for r in dense_runs for s in r.steps]
    dense_step = _mean(s.seconds for s in base)

    def row(label, steps, runs, split):
        mean = _mean(s.seconds for s in steps)
        out = {"label": label, "steps_per_run": len(steps) // max(1, len(runs)),
               "mean_s": mean, "speedup_vs_dense_step": (dense_step / mean) if mean else None}
        if split:
            for name in REGIONS:
                out[f"{name}_s"] = _mean(s.regions.get(name, 0.0) for s in steps)
            out["other_s"] = _mean(s.other for s in steps)
        return out

    rows.append(row("dense (no rettn)", base, dense_runs, split=False))
    for kind in KINDS:
        steps = [s for r in rettn_runs for s in r.steps if s.kind == kind]
        if steps:
            rows.append(row(f"rettn {kind}", steps, rettn_runs, split=True))
    dense_total = statistics.median(r.total_s for r in dense_runs)
    rettn_total = statistics.median(r.total_s for r in rettn_runs)
    ceilings = [r.total_s - sum(s.regions.get("attention", 0.0) for s in r.steps if s.kind == "sparse")
                for r in rettn_runs]
    ceiling = statistics.median(ceilings)
    by_kind = {r["label"]: r for r in rows}
    sparse = by_kind.get("rettn sparse")
    cache = by_kind.get("rettn cache")
    dens = [r.density for r in rettn_runs if r.density is not None]
    return {
        "rows": rows,
        "dense_step_s": dense_step,
        "sparse_step_speedup": sparse["speedup_vs_dense_step"] if sparse else None,
        "cache_step_cost": (cache["mean_s"] / dense_step) if cache and dense_step else None,
        "run": {
            "dense_s": dense_total, "rettn_s": rettn_total, "speedup": dense_total / rettn_total,
            "dense_transformer_s": statistics.median(r.transformer_s for r in dense_runs),
            "rettn_transformer_s": statistics.median(r.transformer_s for r in rettn_runs),
            "ceiling_s": ceiling, "ceiling_speedup": dense_total / ceiling if ceiling > 0 else None,
        },
        "mean_density": _mean(dens),
        "counts": rettn_runs[0].counts if rettn_runs else None,
        "peak_memory_bytes": {"dense": max((r.peak_memory_bytes or 0) for r in dense_runs) or None,
                              "rettn": max((r.peak_memory_bytes or 0) for r in rettn_runs) or None},
    }


def check_targets(targets: dict, summary: dict) -> dict:
    out = {}
    if "min_sparse_step_speedup" in targets and summary["sparse_step_speedup"] is not None:
        v, b = summary["sparse_step_speedup"], targets["min_sparse_step_speedup"]
        out["sparse_step_speedup"] = {"value": v, "bound": b, "met": v >= b}
    if "min_run_speedup" in targets:
        v, b = summary["run"]["speedup"], targets["min_run_speedup"]
        out["run_speedup"] = {"value": v, "bound": b, "met": v >= b}
    return out


# ============================================================================== kernel level
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
        _sync(device)
        a = _mark(device)
        for _ in range(n):
            fn()
        b = _mark(device)
        _sync(device)
        return _elapsed(a, b) / n

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
        raise ValueError("pattern='frame_window' needs the token grid, which this call did not give")
    return selection.frame_window(info.grid, keep, bs, video_start=info.text_first, seq_len=q.shape[2],
                                  device=q.device)


def kernel_table(capture: Capture, config, providers, keeps, repeats: int, warmup: int = 2) -> dict:
    """Kernel timings at the captured attention shape: one row per keep ratio."""
    from rettn.ops.attention import _auto_backend, attention_with_lse, block_sparse_attention, sparse_attention_rescaled

    b, h, s, d = capture.shape
    device, dtype, scale = capture.device, capture.dtype, capture.scale
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    rho = torch.full((b, h, s), 0.9, device=device)
    residual = (0.01 * torch.randn(b, h, s, d, generator=g)).to(device=device, dtype=dtype)
    dense_fns = {}
    if "sdpa" in providers:
        dense_fns["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v, scale=scale)
    if "dense_lse" in providers:
        dense_fns["dense_lse"] = lambda: attention_with_lse(q, k, v, scale=scale)
    rows, notes, dense_ms = [], [], None
    flex_ok = "flex" in providers
    for keep in keeps:
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
                _sync(device)
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
               "backend": config.backend or _auto_backend(q, layout)}
        if "rettn" in ms and "sdpa" in ms:
            row["rettn_vs_sdpa"] = ms["sdpa"] / ms["rettn"]
        if "rettn" in ms and "flex" in ms:
            row["rettn_vs_flex"] = ms["flex"] / ms["rettn"]
        if "flex" in ms and "sdpa" in ms:
            row["flex_vs_sdpa"] = ms["sdpa"] / ms["flex"]
        rows.append(row)
    return {"shape": {"batch": b, "heads": h, "seq": s, "head_dim": d}, "dtype": str(dtype).replace("torch.", ""),
            "pattern": config.pattern, "block_size": config.block_size, "repeats": repeats, "warmup": warmup,
            "rows": rows, "notes": notes}


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


# ============================================================================== environment
def environment(device: torch.device) -> dict:
    import diffusers

    from rettn import __version__

    env = {"device": str(device), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "rettn": __version__, "python": platform.python_version(), "machine": platform.machine(),
           "threads": torch.get_num_threads(),
           "variables": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES",
                                                     "TRITON_INTERPRET") if k in os.environ}}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    else:
        env["device_name"] = _cpu_name()
    return env


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


# ============================================================================== report
def _ms(x, spec=".1f"):
    return "-" if x is None else format(1e3 * x, spec)


def _x(x, spec=".2f"):
    return "-" if x is None else format(x, spec) + "x"


def format_report(report: dict) -> str:
    t, s = report["target"], report["summary"]
    lines = [
        f"rettn profile: {t['description']}",
        f"  on {report['env']['device_name']} ({report['env']['device']}, torch {report['env']['torch']}, "
        f"triton {report['env']['triton']}, {report['env']['threads']} threads), {t['dtype']}",
        f"  rettn: preset {report['preset']}, keep {report['config']['keep']}, {report['config']['pattern']}, "
        f"block {report['config']['block_size']}; {report['steps']} steps: "
        + ", ".join(f"{n} {k}" for k, n in (report["schedule"]["counts"] or {}).items()),
        f"  {report['warmup']['description']}; {report['repeats']} timed run(s) each, dense first",
        "",
        "per step (ms)      | steps/run |    step | attention | selection | bookkeeping |   other | vs dense step",
    ]
    for r in s["rows"]:
        split = "attention_s" in r
        lines.append(
            f"{r['label']:18s} | {r['steps_per_run']:9d} | {_ms(r['mean_s']):>7s} | "
            f"{_ms(r.get('attention_s')) if split else '-':>9s} | {_ms(r.get('selection_s'), '.2f') if split else '-':>9s} | "
            f"{_ms(r.get('bookkeeping_s'), '.2f') if split else '-':>11s} | {_ms(r.get('other_s')) if split else '-':>7s} | "
            f"{_x(r['speedup_vs_dense_step']):>8s}"
        )
    run = s["run"]
    lines += [
        "",
        f"whole run: dense {run['dense_s']:.3f} s, rettn {run['rettn_s']:.3f} s -> speedup {run['speedup']:.2f}x "
        f"| ceiling (sparse attention free) {run['ceiling_s']:.3f} s -> {_x(run['ceiling_speedup'])}",
        f"  transformer only: dense {run['dense_transformer_s']:.3f} s, rettn {run['rettn_transformer_s']:.3f} s; "
        f"sparse step {_x(s['sparse_step_speedup'])} faster than a dense step; a cache step costs "
        f"{_x(s['cache_step_cost'])} a dense step; mean counted density "
        f"{'-' if s['mean_density'] is None else format(s['mean_density'], '.4f')}",
    ]
    mem = s.get("peak_memory_bytes") or {}
    if mem.get("dense") or mem.get("rettn"):
        lines.append(f"  peak GPU memory: dense {(mem.get('dense') or 0) / 2**30:.2f} GiB, "
                     f"rettn {(mem.get('rettn') or 0) / 2**30:.2f} GiB")
    k = report.get("kernels")
    if k and k.get("rows"):
        sh = k["shape"]
        lines += ["", f"kernel level: B={sh['batch']} H={sh['heads']} S={sh['seq']} D={sh['head_dim']} {k['dtype']}, "
                  f"{k['pattern']} block {k['block_size']}, ms per call: medians of {k['repeats']} windows of back-to-back calls",
                  "keep    | density | sdpa    | dense+lse | flex    | rettn   | rettn+rescale | selection | rettn vs sdpa | vs flex"]
        for r in k["rows"]:
            ms = r["ms"]

            def f(name):
                return "-" if ms.get(name) is None else f"{ms[name]:.3f}"

            lines.append(f"{r['keep']:.4f}  | {r['density']:.4f}  | {f('sdpa'):7s} | {f('dense_lse'):9s} | {f('flex'):7s} | "
                         f"{f('rettn'):7s} | {f('rettn_rescaled'):13s} | {f('selection'):9s} | "
                         f"{_x(r.get('rettn_vs_sdpa')):13s} | {_x(r.get('rettn_vs_flex'))}")
        for note in k.get("notes", []):
            lines.append(f"  note: {note}")
    elif k:
        lines += ["", f"kernel level: {k.get('skipped')}"]
    for name, tgt in (report.get("targets") or {}).items():
        if isinstance(tgt, dict) and "met" in tgt:
            lines.append(f"target {name}: {tgt['value']:.2f}x (bound {tgt['bound']}x) -> {'met' if tgt['met'] else 'NOT met'}")
    if report.get("targets_note"):
        lines.append(f"targets: {report['targets_note']}")
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def write_chart(report: dict, path: Path) -> str | None:
    """PNG: stacked time per step kind, and speedup against density. Returns a note when the
    chart could not be drawn (matplotlib missing), else None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: chart skipped (pip install matplotlib)"
    s = report["summary"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    labels = [r["label"] for r in s["rows"]]
    colors = {"attention": "#d62728", "selection": "#ff7f0e", "bookkeeping": "#9467bd", "other": "#7f7f7f"}
    bottoms = [0.0] * len(labels)
    for part in ("attention", "selection", "bookkeeping", "other"):
        heights = [1e3 * (r.get(f"{part}_s") or 0.0) for r in s["rows"]]
        ax1.bar(labels, heights, bottom=bottoms, label=part, color=colors[part])
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    for i, r in enumerate(s["rows"]):
        if "attention_s" not in r:  # the dense baseline: the step time, not split
            ax1.bar([labels[i]], [1e3 * r["mean_s"]], color="#1f77b4", hatch="//", label="step (not split)")
    ax1.set_ylabel("ms per step (mean)")
    ax1.set_title("Time per denoising step, by step kind")
    ax1.legend(fontsize=8)
    ax1.tick_params(axis="x", labelrotation=15)
    k = report.get("kernels") or {}
    rows = k.get("rows") or []
    if rows:
        dens = [r["density"] for r in rows]
        for name, marker, label in (("rettn_vs_sdpa", "o", "rettn kernel vs SDPA"),
                                    ("flex_vs_sdpa", "s", "FlexAttention vs SDPA")):
            pts = [(r["density"], r[name]) for r in rows if r.get(name)]
            if pts:
                ax2.plot(*zip(*sorted(pts)), marker=marker, label=label)
        xs = sorted(dens)
        ax2.plot(xs, [1 / x for x in xs], "k--", linewidth=1, label="1 / density (FLOP bound)")
    d = s.get("mean_density")
    if d:
        if s.get("sparse_step_speedup"):
            ax2.plot([d], [s["sparse_step_speedup"]], "r*", markersize=14, label="sparse step vs dense step (whole transformer)")
        ax2.plot([d], [s["run"]["speedup"]], "gD", markersize=9, label="whole run vs dense")
        if s["run"].get("ceiling_speedup"):
            ax2.plot([d], [s["run"]["ceiling_speedup"]], "g^", markersize=9, fillstyle="none",
                     label="whole-run ceiling (sparse attention free)")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ticker = matplotlib.ticker
    for axis in (ax2.xaxis, ax2.yaxis):
        axis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(ticker.NullFormatter())
    ax2.set_xlabel("density (fraction of token pairs computed)")
    ax2.set_ylabel("speedup (x)")
    ax2.set_title("Speedup against density")
    ax2.axhline(1.0, color="grey", linewidth=0.8)
    ax2.legend(fontsize=7, loc="best")
    fig.suptitle(report["target"]["description"], fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ============================================================================== the command
from rettn.tools.cli import (  # noqa: E402  (shared with generate)
    CLIError, _check_backend, _check_output, _device, _nonneg_int, _positive_int, _steps_value)


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("what to profile (default: the embedded tiny video model)")
    src.add_argument("--model", default=None, help="Hub id or local pipeline folder, profiled end to end")
    src.add_argument("--random-weights", action="store_true",
                     help="build the real transformer of --arch with random weights (no download)")
    src.add_argument("--arch", default=None, help="with --random-weights: cogvideox-2b, cogvideox-5b, wan2.1-1.3b, "
                     "wan2.1-14b, hunyuanvideo, pixart-sigma, flux (configs/arch-*.yaml)")
    src.add_argument("--layers", type=_positive_int, help="with --random-weights: at most N blocks of each kind")
    src.add_argument("--frames", type=_positive_int, help="pixel frames (default: the model's)")
    src.add_argument("--height", type=_positive_int, help="pixels (default: the model's)")
    src.add_argument("--width", type=_positive_int, help="pixels (default: the model's)")
    src.add_argument("--text-len", type=_positive_int, help="with --random-weights: text tokens")
    src.add_argument("--heads", type=_positive_int, help="with --random-weights: attention heads instead of the "
                     "model's (same head dim; a narrower model for quick CPU runs)")
    src.add_argument("--batch", type=_positive_int, help="with --random-weights: batch per transformer call")
    src.add_argument("--prompt", default=None, help="pipelines: the prompt")
    sp = p.add_argument_group("sparsity and schedule (override the preset)")
    sp.add_argument("--preset", default=None, help="rettn preset (default: the model's)")
    sp.add_argument("--keep", type=float)
    sp.add_argument("--pattern", choices=["topk", "window", "frame_window"])
    sp.add_argument("--block-size", type=_positive_int)
    sp.add_argument("--warmup", type=_steps_value, help="dense warm-up steps of the schedule (int) or fraction")
    sp.add_argument("--refresh-interval", type=_steps_value)
    sp.add_argument("--dense-final", type=_steps_value)
    sp.add_argument("--min-seq-len", type=_nonneg_int)
    sp.add_argument("--backend", choices=["triton", "torch", "flex"])
    sp.add_argument("--reselect", choices=["cache", "step"])
    r = p.add_argument_group("runs")
    r.add_argument("--steps", type=_positive_int, help="denoising steps (default: the model's)")
    r.add_argument("--repeats", type=_positive_int, default=1, help="timed runs of each mode (default 1)")
    r.add_argument("--warmup-runs", type=_nonneg_int, default=1,
                   help="untimed warm-up rounds: a 2-step dense run and a 3-step rettn run (dense, cache, sparse) each (default 1)")
    r.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    r.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    r.add_argument("--seed", type=int, default=0)
    k = p.add_argument_group("kernel level")
    k.add_argument("--no-kernels", action="store_true", help="skip the kernel-level table")
    k.add_argument("--kernel-providers", default="sdpa,dense_lse,rettn,rettn_rescaled,flex",
                   help=f"comma-separated subset of {','.join(KERNEL_PROVIDERS)}")
    k.add_argument("--kernel-repeats", type=_positive_int, default=None, help="timed calls per kernel (default 20 GPU, 5 CPU)")
    k.add_argument("--density-sweep", default=None,
                   help="comma-separated keep ratios for the kernel sweep, or 'none' (default: keep/2, 2 keep, 4 keep)")
    o = p.add_argument_group("output")
    o.add_argument("--json", default=None, metavar="FILE", help="JSON report (default: profile_results/profile-<model>.json)")
    o.add_argument("--chart", default=None, metavar="FILE", help="PNG chart (default: next to the JSON)")
    o.add_argument("--no-chart", action="store_true")


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``profile`` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "profile", help="time dense vs rettn per step kind, whole run and kernels",
        description="Latency profile of a diffusion transformer, dense vs with rettn: per denoising step "
        "(attention, block selection, rho/residual bookkeeping, other) for dense / cache / sparse steps, "
        "the whole run, the speedup and the schedule's ceiling, and kernels at the model's real attention "
        "shape. Without --model it profiles the embedded tiny model; --random-weights --arch NAME builds a "
        "real model's transformer with random weights.")
    add_arguments(p)
    p.set_defaults(handler=run)
    return p


def build_parser(prog: str = "rettn profile") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return p


def _config(args, preset: str | None):
    from rettn.core.config import RettnConfig

    overrides = {name: getattr(args, name) for name in SPARSITY_FLAGS if getattr(args, name) is not None}
    if preset is None:
        return RettnConfig.from_dict(overrides)
    return RettnConfig.from_preset(preset, **overrides)


def _check_args(args):
    if args.random_weights and args.arch is None:
        from rettn.tools.profile.archs import arch_names

        raise ProfileError(f"--random-weights needs --arch NAME; known: {', '.join(arch_names())}")
    if args.arch is not None and not args.random_weights:
        raise ProfileError("--arch builds a model with random weights: add --random-weights")
    if args.random_weights and args.model is not None:
        raise ProfileError("--model loads weights; --random-weights builds them: use one")
    if not args.random_weights:
        for flag in ("layers", "text_len", "batch", "heads"):
            if getattr(args, flag) is not None:
                raise ProfileError(f"--{flag.replace('_', '-')} applies to --random-weights only")
    elif args.prompt is not None:
        raise ProfileError("--prompt applies to pipelines; --random-weights runs the bare transformer")
    if args.keep is not None and not 0 < args.keep <= 1:
        raise ProfileError(f"--keep must be in (0, 1], got {args.keep}")
    providers = [x.strip() for x in args.kernel_providers.split(",") if x.strip()]
    bad = [x for x in providers if x not in KERNEL_PROVIDERS]
    if bad:
        raise ProfileError(f"unknown kernel provider(s) {bad}; choose from {', '.join(KERNEL_PROVIDERS)}")
    sweep = None
    if args.density_sweep is not None:
        if args.density_sweep.strip().lower() == "none":
            sweep = []
        else:
            try:
                sweep = [float(x) for x in args.density_sweep.split(",") if x.strip()]
            except ValueError:
                raise ProfileError(f"--density-sweep takes comma-separated keep ratios or 'none', got {args.density_sweep!r}") from None
            if any(not 0 < x <= 1 for x in sweep):
                raise ProfileError(f"--density-sweep values must be in (0, 1], got {args.density_sweep!r}")
    return providers, sweep


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "model"


def with_heads(spec, heads: int | None):
    """``spec`` with ``heads`` attention heads (same head dim: a narrower model, e.g. for the GPU
    check's CPU rehearsal); ``spec`` itself when ``heads`` is None."""
    import dataclasses

    if heads is None:
        return spec
    if "num_attention_heads" not in spec.config:
        raise ProfileError(f"--heads: {spec.name}'s config has no num_attention_heads")
    return dataclasses.replace(spec, config={**spec.config, "num_attention_heads": heads})


def _setup_arch(args, device, dtype, notes):
    from rettn.tools.profile import dummy_inputs
    from rettn.tools.profile.archs import build_transformer, load_arch, model_config

    full_heads = load_arch(args.arch).config.get("num_attention_heads")
    spec = with_heads(load_arch(args.arch), args.heads)
    grid = spec.token_grid(args.frames, args.height, args.width)
    text_len = args.text_len or spec.shape.text_len
    batch = args.batch or spec.shape.batch
    config = model_config(spec, args.layers, text_len)
    t0 = time.perf_counter()
    model = build_transformer(spec, args.layers, device=device, dtype=dtype, seed=args.seed, text_len=text_len)
    _sync(device)
    build_s = time.perf_counter() - t0
    inputs = dummy_inputs.forward_inputs(spec.family, model, batch=batch, seed=args.seed, grid=grid,
                                         text_len=text_len, text_padding=0)
    seq = dummy_inputs.sequence_length(spec.family, model.config, grid, text_len)
    layers = "+".join(str(config[k_]) for k_ in spec.layer_keys)
    full = "+".join(str(spec.config[k_]) for k_ in spec.layer_keys)
    frames, height, width = args.frames or spec.shape.frames, args.height or spec.shape.height, args.width or spec.shape.width
    size = f"{frames} frames {width}x{height}" if frames > 1 else f"{width}x{height}"
    f, h, w = grid
    desc = (f"{spec.model_id} transformer ({spec.class_name}, random weights, {layers} of {full} blocks), "
            f"{size} -> {f}x{h}x{w} tokens, text {text_len}, attention seq {seq}, batch {batch} x "
            f"{spec.shape.calls_per_step} call(s) per step")
    full_size = (all(config[k_] == spec.config[k_] for k_ in spec.layer_keys) and args.heads in (None, full_heads)
                 and (frames, height, width) == (spec.shape.frames, spec.shape.height, spec.shape.width)
                 and text_len == spec.shape.text_len and batch == spec.shape.batch)
    target = {"kind": "random-weights", "name": spec.name, "model_id": spec.model_id, "class": spec.class_name,
              "family": spec.family, "layers": layers, "full_layers": full, "grid": list(grid), "text_len": text_len,
              "seq_len": seq, "batch": batch, "calls_per_step": spec.shape.calls_per_step,
              "frames": frames, "height": height, "width": width, "full_size": bool(full_size),
              "build_s": build_s, "description": desc,
              "parameters": sum(p.numel() for p in model.parameters())}
    runner = TransformerRunner(model, spec.family, inputs, spec.shape.calls_per_step)
    return runner, target, spec.preset, args.steps or spec.shape.steps, spec


@contextlib.contextmanager
def _quiet_loading():
    """No loading bars and no deprecation chatter while a pipeline loads (restored after)."""
    import warnings

    modules = []
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            modules.append(__import__(name, fromlist=["x"]))
        except ImportError:
            pass
    states = [(m.is_progress_bar_enabled(), m.get_verbosity()) for m in modules]
    for m in modules:
        m.disable_progress_bar()
        m.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for m, (bars, verbosity) in zip(modules, states):
            m.set_verbosity(verbosity)
            if bars:
                m.enable_progress_bar()


def _setup_pipeline(args, device, dtype, notes):
    with _quiet_loading():
        return _load_pipeline(args, device, dtype, notes)


def _load_pipeline(args, device, dtype, notes):
    from rettn.tools.models import ModelLoadError, load_pipeline

    if args.model in (None, EMBEDDED):
        from rettn.tiny import load_default_pipeline

        try:
            pipe, weights = load_default_pipeline(device=str(device), dtype=dtype), "trained"
        except FileNotFoundError:
            from rettn.tiny.pipeline import build_pipeline

            from rettn.tools.profile.archs import cast_like_from_pretrained

            pipe, weights = build_pipeline(), "random"
            for part in (pipe.transformer, pipe.text_encoder):
                cast_like_from_pretrained(part, dtype)
            pipe = pipe.to(device)
            notes.append("the embedded model's weights are not in rettn/tiny/weights: profiling the same "
                         "architecture with random weights (the timings do not depend on the weights)")
        name, preset = EMBEDDED, EMBEDDED_PRESET
    else:
        try:
            pipe = load_pipeline(args.model, device=str(device), dtype=dtype)
        except ModelLoadError as e:
            raise ProfileError(str(e)) from None
        weights, name = "loaded", args.model
        from rettn.tools.models import default_preset

        preset = default_preset(pipe)
    pipe.set_progress_bar_config(disable=True)
    params = inspect.signature(pipe.__call__).parameters
    kwargs = {"prompt": args.prompt or EMBEDDED_PROMPT}
    if "output_type" in params:
        kwargs["output_type"] = "np"
    for flag, pname in (("frames", "num_frames"), ("height", "height"), ("width", "width")):
        value = getattr(args, flag)
        if value is None:
            continue
        if pname not in params:
            raise ProfileError(f"--{flag} does not apply to {type(pipe).__name__}")
        kwargs[pname] = value
    default_steps = params["num_inference_steps"].default if "num_inference_steps" in params else None
    steps = args.steps or (default_steps if isinstance(default_steps, int) else 30)
    shape = ", ".join(f"{k_} {v}" for k_, v in kwargs.items() if k_ in ("num_frames", "height", "width"))
    desc = (f"{'embedded tiny model' if name == EMBEDDED else name} ({type(pipe).__name__}, {weights} weights, "
            f"{type(pipe.transformer).__name__}), whole pipeline{', ' + shape if shape else ' at its default size'}, "
            f"prompt {kwargs['prompt']!r}")
    target = {"kind": "pipeline", "name": name, "pipeline": type(pipe).__name__,
              "class": type(pipe.transformer).__name__, "weights": weights, "call": {k_: v for k_, v in kwargs.items()},
              "full_size": False, "description": desc,
              "parameters": sum(p.numel() for p in pipe.transformer.parameters())}
    return PipelineRunner(pipe, kwargs), target, preset, steps, None


def profile(args) -> dict:
    """Run the whole profile described by parsed ``args``; returns the report (also written)."""
    providers, sweep = _check_args(args)
    if args.preset is not None:
        from rettn.core.config import load_preset

        load_preset(args.preset)  # unknown preset: fail before building anything
    device = _device(args.device)
    _check_backend(args.backend, device)
    # where the report goes: checked now, not after the runs
    _check_output(args.json or "profile_results", "--json", folder=args.json is None)
    if args.chart and not args.no_chart:
        _check_output(args.chart, "--chart")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.random_weights:  # check the rettn options before building or loading anything
        from rettn.tools.profile.archs import load_arch

        _config(args, args.preset or load_arch(args.arch).preset)
    elif args.model in (None, EMBEDDED):
        _config(args, args.preset or EMBEDDED_PRESET)
    notes: list[str] = []
    load_before = _load_average()
    if args.random_weights:
        runner, target, preset, steps, spec = _setup_arch(args, device, dtype, notes)
    else:
        runner, target, preset, steps, spec = _setup_pipeline(args, device, dtype, notes)
    preset = args.preset or preset
    config = _config(args, preset)
    target["dtype"] = str(dtype).replace("torch.", "")
    schedule_kinds = config.schedule(steps).kinds(steps)
    counts = {k_: schedule_kinds.count(k_) for k_ in KINDS}

    # ---- warm-up (excluded): compiles kernels, allocators, caches, for every step kind
    capture = Capture()
    warm_cfg = config.replace(warmup=1, refresh_interval=2, dense_final=0)
    t0 = time.perf_counter()
    for i in range(args.warmup_runs):
        timed_run(runner, 2, device, seed=args.seed)
        timed_run(runner, 3, device, warm_cfg, capture=capture, seed=args.seed)
    warm_s = time.perf_counter() - t0
    if args.warmup_runs == 0:  # no warm-up: capture the shape during the first timed rettn run
        notes.append("no warm-up runs: the timed runs include one-time costs (kernel compilation, allocation)")
    warm_desc = (f"warm-up excluded: {args.warmup_runs} round(s) of a 2-step dense run and a 3-step rettn run "
                 f"(dense, cache, sparse steps), {warm_s:.1f} s" if args.warmup_runs else "no warm-up runs (none excluded)")

    # ---- timed runs, dense first in each round
    dense_runs, rettn_runs = [], []
    for i in range(args.repeats):
        dense_runs.append(timed_run(runner, steps, device, seed=args.seed))
        rettn_runs.append(timed_run(runner, steps, device, config,
                                    capture=capture if capture.shape is None else None, seed=args.seed))
        print(f"  timed round {i + 1}/{args.repeats}: dense {dense_runs[-1].total_s:.3f} s, "
              f"rettn {rettn_runs[-1].total_s:.3f} s", file=sys.stderr)
    summary = summarize(dense_runs, rettn_runs)
    measured = [r.kind for r in rettn_runs[0].steps]
    if measured != schedule_kinds:
        notes.append(f"the rettn run's step kinds {measured} differ from the schedule's {schedule_kinds}")

    load_after = _load_average()
    if device.type == "cpu" and load_before is not None and load_before >= (os.cpu_count() or 1):
        notes.append(f"the machine was busy before the runs (load average {load_before:.1f} on {os.cpu_count()} "
                     "cores): other processes skew CPU timings, the sparse path's many small ops most")
    report = {
        "tool": "rettn profile",
        "command": shlex.join(sys.argv),
        "python_executable": sys.executable,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "env": environment(device),
        "target": target,
        "preset": preset,
        "config": dict(vars(config)),
        "steps": steps,
        "schedule": {"kinds": schedule_kinds, "counts": counts},
        "warmup": {"runs": args.warmup_runs, "excluded": True, "seconds": warm_s, "description": warm_desc},
        "repeats": args.repeats,
        "load_average": {"before": load_before, "after": load_after},
        "timing": "CUDA events" if device.type == "cuda" else "time.perf_counter",
        "summary": summary,
        "runs": {"dense": [r.to_json() for r in dense_runs], "rettn": [r.to_json() for r in rettn_runs]},
        "kernels": {"skipped": "not measured yet (the run stopped before the kernel table)"},
        "backend_choices": backend_choices(),  # what backend=None chose for each call shape, and why
        "notes": notes,
    }
    if spec is not None and spec.targets:
        if target["full_size"] and args.preset in (None, spec.preset) and steps == spec.shape.steps and \
                not any(getattr(args, n) is not None for n in SPARSITY_FLAGS):
            report["targets"] = check_targets(spec.targets, summary)
        else:
            report["targets_note"] = (f"{spec.name}'s targets ({spec.targets}) apply to the full shape with its "
                                      "preset and step count: not checked for this run")
    json_path = Path(args.json or f"profile_results/profile-{_slug(target['name'])}.json")
    chart_path = Path(args.chart) if args.chart else json_path.with_suffix(".png")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2, default=str))  # the runs are safe if kernels fail

    # ---- kernel level, at the captured shape
    if args.no_kernels:
        report["kernels"] = {"skipped": "--no-kernels"}
    elif capture.shape is None:
        report["kernels"] = {"skipped": "no attention call was sparse-eligible (every layer stayed dense: "
                                        "sequence shorter than min_seq_len, or skip_layers)"}
    else:
        repeats = args.kernel_repeats or (20 if device.type == "cuda" else 5)
        report["kernels"] = kernel_table(capture, config, providers, density_keeps(config.keep, sweep), repeats)

    if args.no_chart:
        report["chart"] = None
    else:
        note = write_chart(report, chart_path)
        report["chart"] = None if note else str(chart_path)
        if note:
            notes.append(note)
    report["backend_choices"] = backend_choices()  # the kernel table's calls included
    json_path.write_text(json.dumps(report, indent=2, default=str))
    report["json"] = str(json_path)
    print(format_report(report))
    print(f"wrote {json_path}" + (f" and {report['chart']}" if report["chart"] else ""))
    return report


def run(args) -> int:
    """``rettn profile``: 0 on success; bad input prints one line ``rettn: error: ...`` and returns 2."""
    try:
        profile(args)
    except (ProfileError, CLIError, ValueError, OSError) as e:  # bad input, sizes a model refuses, unwritable paths
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"rettn: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def main(argv=None, prog: str = "rettn profile") -> int:
    return run(build_parser(prog).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
