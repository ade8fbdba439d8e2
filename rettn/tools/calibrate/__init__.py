"""``rettn.calibrate``: the cheapest schedule that holds a quality floor, within a memory budget.

    result = rettn.calibrate(pipe, ["a cat on a sofa", "a city at night"], floor_psnr=30)
    result.write("my-preset.yaml")         # + my-preset.json (report) and my-preset.png (chart)
    rettn.apply_rettention(pipe, preset="my-preset.yaml")

1. Dense generation once per (prompt, seed), with :class:`~rettn.tools.calibrate.probe.StatsProbe`
   watching: per layer and step, each keep's attention error and how fast rho and R go stale.
2. Cost models (:mod:`~rettn.tools.calibrate.cost`): measured on this device, and from FLOPs of
   a named architecture (``target``); the search ranks by ``target``'s when given.
3. Every candidate (:mod:`~rettn.tools.calibrate.search`) gets a predicted error, a cache size
   and a cost; those over the memory budget or the attention-error bound are dropped.
4. Full generations confirm candidates cheapest first (skipping any that a failed candidate
   predicts to fail) until one holds the PSNR floor on every sample.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import torch

from rettn.errors import ConfigError, InputError
from rettn.tools.calibrate.cost import CostModel, flops_costs, measured_costs
from rettn.tools.calibrate.probe import StatsProbe
from rettn.tools.calibrate.search import Candidate, Scored, bisect_frontier, candidates, fit_budget, frontier, score

DEFAULT_KEEPS = (0.125, 0.0625, 0.03125)
DEFAULT_INTERVALS = (2, 3, 4, 5, 6, 8, 10)
DEFAULT_WARMUPS = (0.0, 0.1, 0.2, 0.3)  # fractions of the steps
DEFAULT_FINALS = (0.0, 0.05, 0.1)
RESIDUALS = ("native", "float8_e4m3fn", "none")


@dataclasses.dataclass
class CalibrationResult:
    """What :func:`calibrate` found. ``chosen`` is None when no candidate held the floor (or
    sparse attention does not pay: ``sparse_pays`` False); ``config`` the chosen RettnConfig."""

    chosen: Scored | None
    config: object
    base_preset: str | None
    hand: Scored | None
    scored: list
    confirmed: list
    costs: dict
    settings: dict
    sparse_pays: bool = True
    notes: list = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        from rettn.tools.calibrate.report import summary

        return summary(self)

    def report(self) -> dict:
        from rettn.tools.calibrate.report import report

        return report(self)

    def preset_yaml(self) -> str:
        from rettn.tools.calibrate.report import preset_yaml

        return preset_yaml(self)

    def write(self, path) -> list:
        """The preset at ``path`` (a .yaml), its report (.json) and chart (.png) beside it."""
        from rettn.tools.calibrate.report import write

        return write(self, path)


def check_options(prompts, seeds, floor_psnr, max_attn_error, keeps, intervals, warmups, finals, residuals, reselects):
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise InputError(f"prompts must be a non-empty list of non-empty strings, got {prompts!r}")
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise InputError(f"seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    if not isinstance(floor_psnr, (int, float)) or isinstance(floor_psnr, bool) or not 0 <= floor_psnr < math.inf:
        raise ConfigError(f"floor_psnr must be a finite number of dB >= 0, got {floor_psnr!r}")
    if max_attn_error is not None and not (isinstance(max_attn_error, (int, float)) and 0 < max_attn_error < math.inf):
        raise ConfigError(f"max_attn_error must be a finite number > 0 or None, got {max_attn_error!r}")
    if not keeps or not all(isinstance(k, (int, float)) and 0 < k <= 1 for k in keeps):
        raise ConfigError(f"keeps must be fractions in (0, 1], got {keeps!r}")
    if not intervals or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 1 for i in intervals):
        raise ConfigError(f"intervals must be step counts >= 1, got {intervals!r}")
    for name, values in (("warmups", warmups), ("finals", finals)):
        if not values or not all(isinstance(x, (int, float)) and 0 <= x < 1 for x in values):
            raise ConfigError(f"{name} must be fractions of the steps in [0, 1), got {values!r}")
    bad = [r for r in residuals if r not in RESIDUALS]
    if bad or not residuals:
        raise ConfigError(f"residuals must be a subset of {RESIDUALS}, got {residuals!r}")
    if not reselects or any(r not in ("cache", "step") for r in reselects):
        raise ConfigError(f"reselects must be a subset of ('cache', 'step'), got {reselects!r}")


def _generate(pipe, prompt, seed, steps, extra):
    from rettn.tools.args import call_pipeline

    kwargs = dict(prompt=prompt, output_type="np", generator=torch.Generator().manual_seed(seed), **extra)
    if steps is not None:
        kwargs["num_inference_steps"] = steps
    out = call_pipeline(pipe, **kwargs)
    data = out.frames[0] if hasattr(out, "frames") else out.images[0]
    return np.asarray(data, dtype=np.float32)


def _hand(base, num_steps):
    """The base preset as a candidate (its schedule resolved at ``num_steps``)."""
    sch = base.schedule(num_steps)
    final = num_steps - sch.dense_from if sch.dense_from is not None else 0
    residual = "none" if not base.use_residual else (
        "float8_e4m3fn" if base.residual_dtype == "float8_e4m3fn" else "native")
    return Candidate(sch.warmup, sch.interval, final, base.keep, base.reselect, residual, 0), list(base.skip_layers)


def calibrate(pipe, prompts, seeds=(0,), *, floor_psnr: float = 30.0, max_attn_error: float | None = None,
              preset=None, config=None, steps: int | None = None, keeps=DEFAULT_KEEPS, intervals=DEFAULT_INTERVALS,
              warmups=DEFAULT_WARMUPS, finals=DEFAULT_FINALS, reselects=("cache", "step"), residuals=RESIDUALS,
              max_dense_layers: int = 2, max_cache_bytes=None, target: str | None = None,
              max_confirm: int = 8, time_budget: float | None = None, progress: bool = True,
              call_kwargs: dict | None = None) -> CalibrationResult:
    """Search for the cheapest schedule whose generations keep ``floor_psnr`` (dB against dense,
    every prompt x seed) and, when given, a predicted attention error per step at most
    ``max_attn_error``, with cached statistics within ``max_cache_bytes``. See the module
    docstring; the base config (block size, pattern, ramp, what stays dense) comes from
    ``config`` or ``preset`` (default: the model's preset). ``target`` names an architecture of
    ``configs/archs`` whose FLOPs rank the candidates (default: the time measured here).
    ``max_confirm`` and ``time_budget`` (seconds) bound the confirmation runs."""
    from tqdm.auto import tqdm

    from rettn.core.config import parse_bytes
    from rettn.diffusers import apply_rettention
    from rettn.tools.metrics import psnr

    check_options(prompts, seeds, floor_psnr, max_attn_error, keeps, intervals, warmups, finals, residuals, reselects)
    if not isinstance(max_confirm, int) or max_confirm < 1:
        raise ConfigError(f"max_confirm must be an integer >= 1, got {max_confirm!r}")
    if not isinstance(max_dense_layers, int) or max_dense_layers < 0:
        raise ConfigError(f"max_dense_layers must be an integer >= 0, got {max_dense_layers!r}")
    budget = parse_bytes(max_cache_bytes)
    keeps = tuple(dict.fromkeys(float(k) for k in keeps))
    extra = dict(call_kwargs or {})
    started = time.perf_counter()
    samples = [(p, s) for p in prompts for s in seeds]

    resolved = apply_rettention(pipe, config, preset=preset)  # the config apply_rettention would use
    base, preset_name = resolved.config, resolved.preset
    resolved.remove()
    if base.is_auto:
        raise ConfigError("rettn calibrate searches fixed schedules: its base has warmup or refresh_interval 'auto' "
                          "(decided at run time; compare it with scripts/adaptive_heldout.py); give fixed ones")
    all_keeps = tuple(dict.fromkeys(keeps + (base.keep,)))  # the base preset's keep too (the hand row)
    cost_flops = flops_costs(target, all_keeps, base.block_size) if target else None

    # 1. dense references, probed (statistics kept as many steps back as the longest interval)
    n_steps = steps or _default_steps(pipe)
    max_age = max(max(intervals), base.schedule(n_steps).interval) - 1
    handle = apply_rettention(pipe, base.replace(warmup="100%"))
    probe = handle.engine.observe(StatsProbe(handle.engine, all_keeps, max(1, max_age),
                                             base.ramp, base.clamp_rho))
    dense = {}
    try:
        for sample in tqdm(samples, desc="dense + probe", disable=not progress):
            dense[sample] = _generate(pipe, *sample, steps, extra)
            probe.next_sample()
    finally:
        handle.remove()
    num_steps = probe.steps_seen
    layers = probe.layers()
    if not layers:
        raise InputError("no self-attention call reached rettn during the dense run: nothing to calibrate "
                         "(handle.describe() shows why each attention module stays dense)")

    # 2. cost models
    with tqdm(total=len(all_keeps) + 1, desc="timing steps", disable=not progress) as bar:
        cost_measured = measured_costs(pipe, base, all_keeps, dict(prompt=prompts[0], output_type="np", **extra),
                                       seeds[0], progress=bar)
    models = {"measured": cost_measured} | ({"flops": cost_flops} if cost_flops else {})
    rank = cost_flops or cost_measured
    notes = []

    # 3. predictions
    table = probe.table()
    grid = candidates(num_steps, keeps, intervals, warmups, finals, reselects, residuals,
                      min(max_dense_layers, len(layers) - 1))
    scored = []
    for c in grid:
        s = score(c, table, layers, num_steps, probe.entry_bytes)
        if s is not None and budget is not None and s.cache_bytes > budget:
            fits = c.residual == "native" and c.reselect == "cache" and len(residuals) > 1
            s = fit_budget(s, table, layers, num_steps, probe.entry_bytes, budget, residuals) if fits else None
        if s is None:
            continue
        if max_attn_error is not None and s.worst > max_attn_error:
            continue
        _price(s, models, rank, len(layers))
        scored.append(s)
    hand_c, hand_skip = _hand(base, num_steps)
    hand = score(hand_c, table, layers, num_steps, probe.entry_bytes)
    if hand is not None:
        _price(hand, models, rank, len(layers))
    front = [s for s in frontier(scored) if s.cost < num_steps]  # only plans cheaper than dense
    sparse_pays = bool(front) or not scored
    if not scored:
        notes.append("no candidate fits the memory budget / attention-error bound (or the probe's ages)")
    elif not sparse_pays:
        notes.append(f"no candidate is predicted faster than dense ({rank.source}; sparse steps cost "
                     f"{min(rank.sparse.values()):.2f}x a dense step at best): the plan keeps attention dense "
                     "(min_seq_len above this model's sequence)")

    def run_candidate(s: Scored, dense_layers):
        cfg = s.config(base) if dense_layers is None else s.candidate.config(base, dense_layers)
        values, densities = [], []
        for sample in samples:
            h = apply_rettention(pipe, cfg)
            try:
                out = _generate(pipe, *sample, steps, extra)
                densities.append(h.stats().mean_density())
            finally:
                h.remove()
            values.append(psnr(dense[sample], out))
            if values[-1] < floor_psnr:
                break  # one sample below the floor fails the candidate
        s.confirmed = {"psnr": values, "psnr_min": min(values), "psnr_mean": float(np.mean(values)),
                       "density": float(np.mean(densities)), "holds": min(values) >= floor_psnr
                       and len(values) == len(samples)}
        return s.confirmed["holds"]

    # 4. confirmation: bisection along the frontier of predicted cost and error
    if hand is not None:
        run_candidate(hand, hand_skip)  # the hand preset's own skip_layers
    runs = max(1, (len(front)).bit_length())
    with tqdm(total=min(max_confirm, runs), desc="confirming", disable=not progress) as bar:
        def holds(s):
            bar.update(1)
            if time_budget is not None and time.perf_counter() - started > time_budget:
                raise _OutOfTime
            return run_candidate(s, None)

        try:
            chosen, confirmed, cut = bisect_frontier(front, holds, max_confirm)
        except _OutOfTime:
            chosen, cut = None, False
            confirmed = [s for s in front if s.confirmed]
            notes.append(f"stopped at the time budget ({time_budget:.0f} s)")
            held = [s for s in confirmed if s.confirmed["holds"]]
            chosen = min(held, key=lambda s: s.cost) if held else None
    if cut:
        notes.append(f"stopped after {max_confirm} confirmations (max_confirm): the choice may not be the cheapest")
    config_out = None
    if chosen is not None:
        config_out = chosen.config(base)
    elif not sparse_pays:
        seq = max(shape[2] for layer in layers for shape, _ in probe.shapes[layer].values())
        config_out = base.replace(min_seq_len=seq + 1)
    elif scored and not any("stopped" in n for n in notes):
        notes.append("no candidate held the floor: lower floor_psnr, or allow larger keeps / more warm-up")
    settings = dict(prompts=list(prompts), seeds=list(seeds), floor_psnr=floor_psnr, max_attn_error=max_attn_error,
                    num_steps=num_steps, keeps=list(keeps), intervals=list(intervals), warmups=list(warmups),
                    finals=list(finals), reselects=list(reselects), residuals=list(residuals),
                    max_dense_layers=max_dense_layers, max_cache_bytes=budget, target=target,
                    ranked_by=rank.source, layers=len(layers), candidates=len(scored),
                    densities={str(k): probe.mean_density(k) for k in keeps},
                    seconds=time.perf_counter() - started, base_config=dataclasses.asdict(base))
    return CalibrationResult(chosen, config_out, preset_name, hand, scored, confirmed, models, settings,
                             sparse_pays, notes)


def _default_steps(pipe) -> int:
    import inspect

    default = inspect.signature(pipe.__call__).parameters.get("num_inference_steps")
    if default is None or not isinstance(default.default, int):
        raise ConfigError(f"{type(pipe).__name__} has no default num_inference_steps: pass steps=N")
    return default.default


class _OutOfTime(Exception):
    pass


def _price(s: Scored, models: dict, rank: CostModel, n_layers: int):
    frac = len(s.dense_layers) / n_layers
    s.cost = rank.run(s.counts, s.candidate.keep, frac)
    s.costs = {name: m.speedup(s.counts, s.candidate.keep, frac) for name, m in models.items()}


__all__ = ["calibrate", "CalibrationResult", "Candidate", "CostModel", "StatsProbe"]
