"""The profile's report: the environment it ran in, the text table and the PNG chart."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def triton_version() -> str | None:
    """The installed Triton's version, None without it."""
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def environment(device: torch.device) -> dict:
    """Device, versions, threads and the variables that change timings, for the report."""
    import diffusers

    from rettn._version import __version__

    env = {"device": str(device), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "rettn": __version__, "python": platform.python_version(), "machine": platform.machine(),
           "threads": torch.get_num_threads(),
           "variables": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES",
                                                     "TRITON_INTERPRET") if k in os.environ}}
    env["triton"] = triton_version()
    if device.type == "cuda":
        env["device_name"] = device_name(device)
        env["cuda"] = torch.version.cuda
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    else:
        env["device_name"] = device_name(device)
    return env


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def cpu_name() -> str:
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


def baseline_line(b: dict) -> str:
    """One line on the dense baseline: its backend, how it was chosen, SDPA's time per backend."""
    times = ", ".join(f"{n} {ms:.3f}" for n, ms in sorted((b.get("timings_ms") or {}).items(), key=lambda x: x[1]))
    how = {"measured": "measured fastest", "named": "named by --dense-backend",
           "default": "PyTorch's own order"}.get(b["source"], b["source"])
    parts = [f"{b['describe']}, {how}"]
    if times:
        parts.append(f"SDPA ms per call at the model's attention shape: {times}")
    if b.get("pytorch_default") and b.get("pinned"):
        parts.append(f"PyTorch's default pick there: {b['pytorch_default']}")
    for name, why in (b.get("skipped") or {}).items():
        parts.append(f"{name}: {why}")
    if b.get("note"):
        parts.append(b["note"])
    return "; ".join(parts)


def format_report(report: dict) -> str:
    t, s = report["target"], report["summary"]
    vs = s.get("baseline") or "dense SDPA"
    lines = [
        f"rettn profile: {t['description']}",
        f"  on {report['env']['device_name']} ({report['env']['device']}, torch {report['env']['torch']}, "
        f"triton {report['env']['triton']}, {report['env']['threads']} threads), {t['dtype']}",
        f"  rettn: preset {report['preset']}, keep {report['config']['keep']}, {report['config']['pattern']}, "
        f"block {report['config']['block_size']}; {report['steps']} steps: "
        + ", ".join(f"{n} {k}" for k, n in (report["schedule"]["counts"] or {}).items()),
        f"  {report['warmup']['description']}; {report['repeats']} timed run(s) each, dense first",
        f"  dense baseline: {baseline_line(report['dense_baseline'])}" if report.get("dense_baseline") else
        f"  dense baseline: {vs}",
        "",
        f"per step (ms)      | steps/run |    step | attention | selection | bookkeeping |   other | vs a {vs} step",
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
        f"vs {vs} | ceiling (sparse attention free) {run['ceiling_s']:.3f} s -> {_x(run['ceiling_speedup'])}",
        f"  transformer only: dense {run['dense_transformer_s']:.3f} s, rettn {run['rettn_transformer_s']:.3f} s; "
        f"sparse step {_x(s['sparse_step_speedup'])} faster than a {vs} step; a cache step costs "
        f"{_x(s['cache_step_cost'])} a {vs} step; mean counted density "
        f"{'-' if s['mean_density'] is None else format(s['mean_density'], '.4f')}",
    ]
    mem = s.get("peak_memory_bytes") or {}
    if mem.get("dense") or mem.get("rettn"):
        lines.append(f"  peak GPU memory: dense {(mem.get('dense') or 0) / 2**30:.2f} GiB, "
                     f"rettn {(mem.get('rettn') or 0) / 2**30:.2f} GiB")
    k = report.get("kernels")
    if k and k.get("rows"):
        sh = k["shape"]
        sdpa = k.get("sdpa_backend", "PyTorch's default pick")
        lines += ["", f"kernel level: B={sh['batch']} H={sh['heads']} S={sh['seq']} D={sh['head_dim']} {k['dtype']}, "
                  f"{k['pattern']} block {k['block_size']}, ms per call: medians of {k['repeats']} windows of back-to-back calls; "
                  f"sdpa: SDPA on {sdpa}",
                  "keep    | density | sdpa    | dense+lse | flex    | rettn   | rettn+rescale | selection | "
                  f"rettn vs sdpa ({sdpa}) | vs flex"]
        for r in k["rows"]:
            ms = r["ms"]

            def f(name):
                return "-" if ms.get(name) is None else f"{ms[name]:.3f}"

            lines.append(f"{r['keep']:.4f}  | {r['density']:.4f}  | {f('sdpa'):7s} | {f('dense_lse'):9s} | {f('flex'):7s} | "
                         f"{f('rettn'):7s} | {f('rettn_rescaled'):13s} | {f('selection'):9s} | "
                         f"{_x(r.get('rettn_vs_sdpa')):{16 + len(sdpa)}s} | {_x(r.get('rettn_vs_flex'))}")
        if k.get("partial"):
            lines.append(f"  partial: {k['partial']}")
        for note in k.get("notes", []):
            lines.append(f"  note: {note}")
    elif k:
        lines += ["", f"kernel level: {k.get('skipped')}"]
    for name, tgt in (report.get("targets") or {}).items():
        if isinstance(tgt, dict) and "met" in tgt:
            lines.append(f"target {name}: {tgt['value']:.2f}x vs {tgt.get('vs') or vs} (bound {tgt['bound']}x) -> "
                         f"{'met' if tgt['met'] else 'NOT met'}")
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
    vs = s.get("baseline") or "dense SDPA"
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
        sdpa = f"SDPA ({k.get('sdpa_backend', 'default')})"
        for name, marker, label in (("rettn_vs_sdpa", "o", f"rettn kernel vs {sdpa}"),
                                    ("flex_vs_sdpa", "s", f"FlexAttention vs {sdpa}")):
            pts = [(r["density"], r[name]) for r in rows if r.get(name)]
            if pts:
                ax2.plot(*zip(*sorted(pts)), marker=marker, label=label)
        xs = sorted(dens)
        ax2.plot(xs, [1 / x for x in xs], "k--", linewidth=1, label="1 / density (FLOP bound)")
    d = s.get("mean_density")
    if d:
        if s.get("sparse_step_speedup"):
            ax2.plot([d], [s["sparse_step_speedup"]], "r*", markersize=14, label=f"sparse step vs a {vs} step (whole transformer)")
        ax2.plot([d], [s["run"]["speedup"]], "gD", markersize=9, label=f"whole run vs {vs}")
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

