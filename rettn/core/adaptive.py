"""The adaptive schedule: ``warmup="auto"`` and ``refresh_interval="auto"``.

At every cache step rettn computes dense attention anyway. Before it replaces a layer's cached
rho and R there, it measures what those statistics would have given at this step: the sparse
output rescaled with the old rho (ramped as the next sparse step would use it) plus the old R,
against the fresh dense output, as a relative L2 error (:func:`rettn.ops.reference.relative_error`,
the measure ``rettn calibrate``'s probe uses offline), on 4 evenly spaced heads of each call: one
sparse pass over those heads (:func:`stale_error`).

Decisions are made once per step, at the start of the next step, from the errors measured in
the steps since (one host read): their mean over the calls of every sparse layer, CFG branch and
batch row. One interval serves the whole model (every layer refreshes at the same step): a step
stays one kind (dense, cache or sparse), so its cost, the profiler's regions and ``stats()``
stay per step, and the dense pass of a cache step covers every layer in the same sweep; the
worst layer is recorded beside the mean (``stats().refreshes``) for a user who wants to skip it.

The rules (``n``: the generation's steps; unknown for a bare transformer without
``num_inference_steps``):

- **floor**: ``warmup="auto"`` starts with ``max(1, round(0.1 n))`` dense steps (2 without ``n``);
  the high-noise steps move the statistics fastest, and measuring them costs cache steps;
- **warm-up**: after the floor, every step is a cache step (interval 1) until the error of
  one-step-old statistics is at most ``tolerance``; then the interval is 2 (``refresh_interval``
  "auto") or the fixed one. A fixed ``warmup`` starts at interval 2 after its dense steps;
- **interval**: at each refresh the error ``e`` of statistics ``age`` steps old decides the next
  interval. The error grows about linearly with the age (measured on the embedded model: 0.04,
  0.09, 0.14, 0.19 at ages 1-4), so the next interval ``I`` is the longest whose sparse steps'
  oldest statistics (``I - 1`` steps old) have an extrapolated error within the tolerance,
  ``floor(age * tolerance / e) + 1``, growing by at most one step per refresh, at least 1 (every
  step a cache step: even one-step-old statistics are over the tolerance, so no sparse step runs
  until they are under it again) and at most ``max(2, round(0.2 n))`` steps (10 without ``n``).
  The warm-up's test is the same at interval 2: its sparse steps use one-step-old statistics;
- a refresh due at the last step before the dense tail (or the end) runs a dense step instead:
  nothing would use its statistics, and its output is the dense one anyway;
- the dense tail (``dense_final``) is as in a fixed schedule; when a pipeline's second
  transformer takes over (Wan 2.2), its layers refresh at once and the interval restarts at 2.

What it does at few steps (nothing measured yet decides the first ones): 4 steps: D C C, then
S when the one-step error is under the tolerance (else D: no sparse step, which warns);
8 steps: D C C then S/C by the measure, the cap is 2, the last step dense; 50 steps: 5 dense
steps, cache steps until settled, then intervals 2, 3, ... up to 10. (docs/usage.md has what
the embedded model did: at 4 and 8 steps its statistics never settle at the default tolerance.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rettn.core.config import AUTO, RettnConfig
from rettn.core.residual import dequantize_fp8
from rettn.ops.attention import sparse_step_attention
from rettn.ops.layout import BlockSparseLayout
from rettn.ops.reference import relative_error

FLOOR = 0.1  # warmup="auto": this fraction of the steps is dense before any measure (at least 1 step)
FLOOR_UNKNOWN = 2  # ... without a step count
CAP = 0.2  # the longest interval, as a fraction of the steps (at least 2 steps)
CAP_UNKNOWN = 10  # ... without a step count
HEADS = 4  # the measure runs on this many heads, evenly spaced (all of them when there are fewer)


@dataclass
class Refresh:
    """One measured refresh: at cache step ``step`` the statistics were ``age`` steps old and gave
    a mean relative error ``error`` (``worst`` at layer ``worst_layer``) over ``calls`` attention
    calls; ``interval`` is the interval chosen from it (1: still warming up)."""

    step: int
    age: int
    error: float
    worst: float
    worst_layer: int
    calls: int
    interval: int

    def __str__(self):
        return (f"{self.age}-step-old: error {self.error:.4f} (worst {self.worst:.4f}, layer "
                f"{self.worst_layer}) -> every {self.interval}")


class AutoSchedule:
    """The step kinds of one generation under an adaptive schedule (see the module docstring)."""

    def __init__(self, config: RettnConfig, num_steps: int | None):
        self.config, self.n = config, num_steps
        self.tolerance = float(config.tolerance)
        n = num_steps

        def steps(value) -> int:
            return int(round(value * n)) if isinstance(value, float) else int(value)

        if config.warmup == AUTO:
            self.floor = FLOOR_UNKNOWN if n is None else max(1, int(round(FLOOR * n)))
        else:
            self.floor = steps(config.warmup)
        self.auto_interval = config.refresh_interval == AUTO
        # a fixed interval after an adaptive warm-up: at least 2 (a fraction may round to 1 step)
        self.fixed = None if self.auto_interval else max(2, steps(config.refresh_interval))
        self.cap = CAP_UNKNOWN if n is None else max(2, int(round(CAP * n)))
        self.dense_from = None if n is None else n - steps(config.dense_final)
        self.settled = config.warmup != AUTO  # warm-up over (a fixed warm-up needs no measure)
        self.interval = (2 if self.auto_interval else self.fixed) if self.settled else 1
        self.last_cache: int | None = None
        self.age = 1  # how old the statistics replaced at the last cache step were
        self.settled_at: int | None = None  # the cache step whose measure ended the warm-up
        self.pending: list = []  # (layer, 0-d error tensor) measured since the last decision
        self.refreshes: list[Refresh] = []

    # ------------------------------------------------------------------ measuring (per call)
    def measure(self, layer: int, error: torch.Tensor):
        """A cache-step call's error of the statistics it replaces (a 0-d tensor: no sync here)."""
        self.pending.append((layer, error))

    def restart(self):
        """Another transformer takes over (its statistics were dropped): refresh now, then every
        2 steps at most until measured again."""
        self.last_cache = None
        self.interval = min(self.interval, 2) if self.settled else 1

    # ------------------------------------------------------------------ deciding (per step)
    def kind(self, step: int) -> str:
        self.decide()
        if step < self.floor or (self.dense_from is not None and step >= self.dense_from):
            return "dense"
        if self.last_cache is None or step - self.last_cache >= self.interval:
            if self.dense_from is not None and step + 1 >= self.dense_from:
                return "dense"  # no later step would use its statistics: the same output, cheaper
            self.age = 1 if self.last_cache is None else step - self.last_cache
            self.last_cache = step
            return "cache"
        return "sparse"

    def decide(self):
        """Fold the errors measured since the last decision into the next interval (one host
        read; a no-op when nothing was measured). Called at each new step, and by ``stats()``."""
        if not self.pending:
            return
        layers = [layer for layer, _ in self.pending]
        device = self.pending[0][1].device
        errors = torch.stack([e.float().to(device) for _, e in self.pending]).tolist()  # the step's host read
        self.pending = []
        mean, worst = sum(errors) / len(errors), max(errors)
        age, tol = self.age, self.tolerance
        if not self.settled:
            if mean <= tol:
                self.settled, self.settled_at = True, self.last_cache
                self.interval = 2 if self.auto_interval else self.fixed
        elif self.auto_interval:  # error grows about linearly with age: the sparse steps' oldest within tol
            fit = int(age * tol / mean) + 1 if mean > 0 else self.cap
            self.interval = max(1, min(self.cap, age + 1, fit))
        self.refreshes.append(Refresh(self.last_cache, age, mean, worst, layers[errors.index(worst)],
                                      len(errors), self.interval))

    def summary(self) -> str:
        """One line: what the adaptive schedule did this generation."""
        cfg = self.config
        head = (f"adaptive schedule (warmup={cfg.warmup!r}, refresh_interval={cfg.refresh_interval!r}, "
                f"tolerance {self.tolerance:g}): {self.floor} dense step(s) first")
        if not self.refreshes:
            return head + ", no refresh measured yet"
        warm = ("" if cfg.warmup != AUTO else
                f", warm-up settled at step {self.settled_at}" if self.settled else
                ", warm-up never settled (every step a cache step)")
        errors, intervals = [r.error for r in self.refreshes], [r.interval for r in self.refreshes]
        return (head + warm + f"; {len(errors)} refresh(es) measured: error {min(errors):.3f}-{max(errors):.3f} "
                f"(mean {sum(errors) / len(errors):.3f}), intervals {min(intervals)}-{max(intervals)} "
                "(stats().refreshes: each)")


def stale_error(engine, q, k, v, scale, old, new, out_d) -> torch.Tensor:
    """What the statistics ``old`` a cache step replaces would have given at this step: the
    relative error against the step's dense output ``out_d`` (a 0-d tensor, no sync). One sparse
    pass on :data:`HEADS` evenly spaced heads (CogVideoX-2B: 4 of 30, so about 0.6% of a dense
    step at the measured kernel speed), on the blocks a sparse step would use now (the cached
    ones; the fresh ones with ``reselect="step"``). Offloaded R: only those heads come back, once
    its copy to the host (issued at its cache step, a step or more before) has landed (a host wait
    on that copy's event, CUDA only)."""
    cfg = engine.config
    layout = new.layout if cfg.reselect == "step" and cfg.pattern == "topk" else old.layout
    heads = slice(0, q.shape[1], max(1, -(-q.shape[1] // HEADS)))

    def part(t):
        return t if t is None or t.shape[1] == 1 else t[:, heads]

    sub = BlockSparseLayout(part(layout.kv_num_blocks), part(layout.kv_indices), layout.block_q, layout.block_k,
                            layout.seq_q, layout.seq_k, validate=False)
    residual = part(old.residual)
    with engine.region("attention", q.device):
        if residual is not None:
            if old.residual.device != q.device:  # offloaded: its copy to the host (a step or more ago) has landed
                engine.residuals.wait(old.residual)
            residual = residual.to(q.device)
            if old.residual_scale is not None:
                residual = dequantize_fp8(residual, part(old.residual_scale), q.dtype)
        rho = part(old.rho)
        qs, ks, vs = (t[:, heads].contiguous() for t in (q, k, v))
        pred, _, _ = sparse_step_attention(qs, ks, vs, sub, None if rho is None else rho.contiguous(),
                                           None if residual is None else residual.contiguous(), scale=scale,
                                           ramp=0.0, clamp_rho=cfg.clamp_rho, check_finite=False,
                                           backend=cfg.backend)
        return relative_error(pred, out_d[:, heads])
