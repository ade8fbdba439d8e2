"""Candidate schedules, their predicted attention error (from the probe) and cost (from a cost
model), and the order in which full generations confirm them.

A candidate is a schedule (dense warm-up, refresh interval, dense tail), a keep, ``reselect``, how
R is kept (``native``: the attention's dtype, ``float8_e4m3fn``, ``none``: rho only) and how many
layers stay dense (the ones with the largest predicted error under that candidate). Its
predicted error is the mean, over every (step, layer) of the generation, of the probe's error for
that step's age since its cache step (0 at dense and cache steps and in dense layers); its
``worst`` is the largest per-step mean over the layers.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

from rettn.core.config import RettnConfig


@dataclass(frozen=True)
class Candidate:
    warmup: int
    interval: int
    final: int
    keep: float
    reselect: str = "cache"
    residual: str = "native"
    n_dense_layers: int = 0

    def label(self) -> str:
        parts = [f"warmup {self.warmup}", f"every {self.interval}", f"tail {self.final}", f"keep {self.keep:g}"]
        if self.reselect != "cache":
            parts.append(f"reselect {self.reselect}")
        if self.residual != "native":
            parts.append({"none": "rho only", "per-layer": "R per layer"}.get(self.residual, f"R {self.residual}"))
        if self.n_dense_layers:
            parts.append(f"{self.n_dense_layers} dense layer(s)")
        return ", ".join(parts)

    def config(self, base: RettnConfig, dense_layers=(), layer_residual=None) -> RettnConfig:
        return base.replace(
            keep=self.keep, warmup=self.warmup, refresh_interval=self.interval, dense_final=self.final,
            reselect=self.reselect, use_rho=True, use_residual=self.residual != "none",
            residual_dtype=self.residual if self.residual == "float8_e4m3fn" else base.residual_dtype,
            skip_layers=sorted(set(base.skip_layers) | set(dense_layers)),
            layer_residual=dict(base.layer_residual if layer_residual is None else layer_residual),
        )


@dataclass
class Scored:
    candidate: Candidate
    counts: dict
    error: float  # predicted mean attention error over the run
    worst: float  # predicted worst step (mean over layers)
    dense_layers: tuple
    cache_bytes: int
    cost: float = float("nan")  # in dense steps (the chosen cost model)
    costs: dict = field(default_factory=dict)  # cost model name -> predicted whole-run speedup
    confirmed: dict | None = None  # psnr per sample, min, mean, density, when generated
    layer_residual: dict = field(default_factory=dict)  # per-layer R forms (residual "per-layer")

    def config(self, base: RettnConfig) -> RettnConfig:
        return self.candidate.config(base, self.dense_layers, self.layer_residual)

    def as_dict(self) -> dict:
        c = self.candidate
        return {"label": c.label(), "warmup": c.warmup, "refresh_interval": c.interval, "dense_final": c.final,
                "keep": c.keep, "reselect": c.reselect, "residual": c.residual, "dense_layers": list(self.dense_layers),
                "steps": self.counts, "predicted_attn_error": self.error, "predicted_worst_step_error": self.worst,
                "layer_residual": {str(k): v for k, v in self.layer_residual.items()}, "cache_bytes": self.cache_bytes, "cost_dense_steps": self.cost, "predicted_speedup": self.costs,
                "confirmed": self.confirmed}


def candidates(num_steps: int, keeps, intervals, warmups, finals, reselects, residuals, max_dense_layers: int):
    """Every combination (warm-ups and tails given as fractions of the steps, deduplicated)."""
    seen = set()
    for w, i, f, k, r, res, d in itertools.product(warmups, intervals, finals, keeps, reselects, residuals,
                                                   range(max_dense_layers + 1)):
        if r == "step" and res != "native":
            continue  # the probe measures fresh blocks with R in the attention's dtype only
        c = Candidate(int(round(w * num_steps)), int(i), int(round(f * num_steps)), float(k), r, res, d)
        if c.warmup + c.final >= num_steps or c in seen:
            continue
        seen.add(c)
        yield c


def _errors(c: Candidate, table: dict, layers: list, num_steps: int, variant: str):
    """({layer: [error per step]}, step counts) of ``c`` with R kept as ``variant``; errors None
    when the probe has no value for one of its sparse steps (an age beyond its ``max_age``)."""
    kinds = RettnConfig(warmup=c.warmup, refresh_interval=c.interval, dense_final=c.final).schedule(num_steps)
    per_layer = {layer: [0.0] * num_steps for layer in layers}
    counts = {"dense": 0, "cache": 0, "sparse": 0}
    for s in range(num_steps):
        kind = kinds.kind(s)
        counts[kind] += 1
        if kind != "sparse":
            continue
        age = s - kinds.last_cache_step(s)
        for layer in layers:
            e = table.get((layer, s, c.keep, age, variant))
            if e is None:
                return None, counts
            per_layer[layer][s] = e
    return per_layer, counts


def score(c: Candidate, table: dict, layers: list, num_steps: int, bytes_of) -> Scored | None:
    """Predicted error of ``c`` from the probe's ``table``; None when the probe has no value for
    one of its sparse steps (an age beyond the probe's ``max_age``)."""
    per_layer, counts = _errors(c, table, layers, num_steps, "step" if c.reselect == "step" else c.residual)
    if per_layer is None:
        return None
    worst_layers = sorted(layers, key=lambda layer: -sum(per_layer[layer]))[: c.n_dense_layers]
    kept = [layer for layer in layers if layer not in worst_layers]
    if c.n_dense_layers and not kept:
        return None
    total = sum(sum(per_layer[layer]) for layer in kept)
    worst = max((sum(per_layer[layer][s] for layer in kept) / len(layers) for s in range(num_steps)), default=0.0)
    cache_bytes = sum(bytes_of(layer, c.residual) for layer in kept)
    return Scored(c, counts, total / (num_steps * len(layers)), worst, tuple(sorted(worst_layers)), cache_bytes)


def frontier(scored: list) -> list:
    """The Pareto frontier of (predicted cost, predicted error), cheapest first: each entry has a
    lower predicted error than every cheaper one. A candidate off the frontier costs at least as
    much as one predicted to be no worse, so the search needs only these."""
    out = []
    for s in sorted(scored, key=lambda s: (s.cost, s.error, s.worst)):
        if not out or s.error < out[-1].error:
            if out and s.cost == out[-1].cost:
                out[-1] = s
            else:
                out.append(s)
    return out


def bisect_frontier(front: list, holds, max_runs: int):
    """The cheapest frontier entry for which ``holds(entry)`` is True, by bisection: along the
    frontier the predicted error falls as the cost rises, so (if quality falls with the
    predicted error) a failure moves the search to dearer entries and a success to cheaper ones.
    Returns (chosen or None, entries run in order, whether ``max_runs`` cut the search short)."""
    lo, hi, best, ran = 0, len(front) - 1, None, []
    while lo <= hi:
        if len(ran) >= max_runs:
            return best, ran, True
        mid = (lo + hi) // 2
        ran.append(front[mid])
        if holds(front[mid]):
            best, hi = front[mid], mid - 1
        else:
            lo = mid + 1
    return best, ran, False


def fit_budget(s: Scored, table: dict, layers: list, num_steps: int, bytes_of, budget: int, forms) -> Scored | None:
    """``s`` (R in the attention's dtype, over ``budget``) with R kept per layer so that it fits:
    starting from every layer's R in the attention's dtype, the step that adds the least
    predicted error per byte saved (a layer's R to fp8, or fp8 to none, among ``forms``) is taken
    until the cached bytes fit. None when even the smallest forms do not fit."""
    order = [f for f in ("native", "float8_e4m3fn", "none") if f in forms]
    kept = [layer for layer in layers if layer not in s.dense_layers]
    errors = {}
    for form in order:
        per_layer, _ = _errors(s.candidate, table, layers, num_steps, form)
        if per_layer is None:
            return None
        errors[form] = per_layer
    at = {layer: 0 for layer in kept}  # index into order
    total = sum(bytes_of(layer, order[0]) for layer in kept)
    while total > budget:
        best = None
        for layer in kept:
            i = at[layer]
            if i + 1 >= len(order):
                continue
            saved = bytes_of(layer, order[i]) - bytes_of(layer, order[i + 1])
            cost = sum(errors[order[i + 1]][layer]) - sum(errors[order[i]][layer])
            if saved > 0 and (best is None or cost / saved < best[0]):
                best = (cost / saved, layer, saved)
        if best is None:
            return None
        at[best[1]] += 1
        total -= best[2]
    chosen = {layer: order[i] for layer, i in at.items()}
    steps = [sum(errors[chosen[layer]][layer][t] for layer in kept) / len(layers) for t in range(num_steps)]
    return Scored(dataclasses.replace(s.candidate, residual="per-layer"), s.counts, sum(steps) / num_steps,
                  max(steps, default=0.0), s.dense_layers, total,
                  layer_residual={layer: form for layer, form in chosen.items() if form != "native"})
