"""Summaries of timed runs: means per step kind, whole-run speedup, the schedule's ceiling, and
an architecture's speed targets."""

from __future__ import annotations

import statistics

from rettn.tools.profile.clocks import REGIONS

KINDS = ("dense", "cache", "sparse")


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def summarize(dense_runs: list, rettn_runs: list, baseline: str | None = None) -> dict:
    """Per step kind means, whole-run times, speedups and the schedule's ceiling; ``baseline``
    names the dense run's attention (``"dense SDPA (cudnn)"``), written next to every speedup."""
    baseline = baseline or "dense SDPA (PyTorch's default pick)"
    rows = []
    base = [s for r in dense_runs for s in r.steps]
    dense_step = _mean(s.seconds for s in base)

    def row(label, steps, runs, split):
        mean = _mean(s.seconds for s in steps)
        out = {"label": label, "steps_per_run": len(steps) // max(1, len(runs)),
               "mean_s": mean, "speedup_vs_dense_step": (dense_step / mean) if mean else None,
               "speedup_vs": baseline}
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
        "baseline": baseline,
        "rows": rows,
        "dense_step_s": dense_step,
        "sparse_step_speedup": sparse["speedup_vs_dense_step"] if sparse else None,
        "cache_step_cost": (cache["mean_s"] / dense_step) if cache and dense_step else None,
        "run": {
            "dense_s": dense_total, "rettn_s": rettn_total, "speedup": dense_total / rettn_total,
            "dense_transformer_s": statistics.median(r.transformer_s for r in dense_runs),
            "rettn_transformer_s": statistics.median(r.transformer_s for r in rettn_runs),
            "ceiling_s": ceiling, "ceiling_speedup": dense_total / ceiling if ceiling > 0 else None,
            "speedup_vs": baseline,
        },
        "mean_density": _mean(dens),
        "counts": rettn_runs[0].counts if rettn_runs else None,
        "peak_memory_bytes": {"dense": max((r.peak_memory_bytes or 0) for r in dense_runs) or None,
                              "rettn": max((r.peak_memory_bytes or 0) for r in rettn_runs) or None},
    }


def check_targets(targets: dict, summary: dict, baseline: str | None = None) -> dict:
    """Each speed target of an architecture: its value, bound, whether met, and against what."""
    out = {}
    vs = baseline or summary.get("baseline")
    if "min_sparse_step_speedup" in targets and summary["sparse_step_speedup"] is not None:
        v, b = summary["sparse_step_speedup"], targets["min_sparse_step_speedup"]
        out["sparse_step_speedup"] = {"value": v, "bound": b, "met": v >= b, "vs": vs}
    if "min_run_speedup" in targets:
        v, b = summary["run"]["speedup"], targets["min_run_speedup"]
        out["run_speedup"] = {"value": v, "bound": b, "met": v >= b, "vs": vs}
    return out

