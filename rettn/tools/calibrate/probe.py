"""The probe: one dense generation measures what every schedule would cost in attention error.

At every self-attention call of a dense run (the calibration's reference run) and for each keep,
:class:`StatsProbe` selects the blocks the engine would select, computes the cache step's rho
and R, and stores them. At the later steps it applies the stored statistics of each age (1 up
to ``max_age`` steps old: the sparse steps that follow a cache step) to the new call, the way a
sparse step would, and records the relative L2 error against dense attention on the same
inputs, for each way of keeping R:

- ``native``: R in the attention's dtype, blocks reused from the cache step (``reselect="cache"``);
- ``float8_e4m3fn``: R in fp8 with a scale per row;
- ``none``: no R (rho only: ``use_residual=False``);
- ``step``: R in the attention's dtype, blocks selected afresh at the sparse step (``reselect="step"``).

The error is that of one step's attention given the dense run's inputs: it ranks schedules (how
fast rho and R go stale, which layers suffer at which keep) but is not the error a sparse run
accumulates; the search confirms its best candidates with full generations.
"""

from __future__ import annotations

from collections import defaultdict, deque

import torch

from rettn.core.observers import Observer
from rettn.core.residual import dequantize_fp8, quantize_fp8
from rettn.core.state import statistics_bytes
from rettn.ops.attention import attention_with_lse, block_sparse_attention
from rettn.ops.reference import cache_statistics, relative_error, step_rho

VARIANTS = ("native", "float8_e4m3fn", "none", "step")


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float(relative_error(out, ref))  # the adaptive schedule's measure (core.adaptive)


class StatsProbe(Observer):
    """An engine observer for an all-dense run (see the module docstring).

    errors[(layer, step, keep, age, variant)]: relative errors, one per call (CFG branch, row);
    plain[(layer, step, keep)]: errors of plain block-sparse attention (no statistics);
    density[keep]: counted densities of the selected layouts; shapes[layer]: {(branch, row,
    call): ((B, H, S, D), dtype)}, the calls whose statistics a plan caches (for its memory)."""

    def __init__(self, engine, keeps, max_age: int, ramp: float, clamp_rho: bool = True):
        self.engine, self.keeps, self.max_age = engine, tuple(keeps), int(max_age)
        self.ramp, self.clamp = float(ramp), bool(clamp_rho)
        self.errors: dict = defaultdict(list)
        self.plain: dict = defaultdict(list)
        self.density: dict = defaultdict(list)
        self.shapes: dict = defaultdict(dict)
        self.history: dict = {}  # (prompt run, branch, row, layer, call, keep) -> deque of entries
        self.run = 0  # which calibration sample (prompt, seed) is running
        self.steps_seen = 0

    def next_sample(self):
        self.run += 1
        self.history.clear()

    def on_call(self, q, k, v, scale, info):
        if info.kind != "self" or q.shape[2] != k.shape[2]:
            return
        eng = self.engine
        step = eng.step
        self.steps_seen = max(self.steps_seen, step + 1)
        layer = info.slot.layer if info.slot is not None else info.layer
        self.shapes[layer][(eng.branch, info.row, info.call)] = (tuple(q.shape), q.dtype)
        out_d, lse_d = attention_with_lse(q, k, v, scale=scale)
        for keep in self.keeps:
            layout = eng.layout(q, k, info, keep)
            self.density[keep].append(float(layout.density_tensor()))
            o_s, lse_s = block_sparse_attention(q, k, v, layout, scale=scale, return_lse=True)
            self.plain[(layer, step, keep)].append(_rel(o_s, out_d))
            key = (self.run, eng.branch, info.row, layer, info.call, keep)
            past = self.history.setdefault(key, deque(maxlen=self.max_age))
            for p_step, p_layout, p_rho, p_res, p_fp8 in past:
                age = step - p_step
                rho = p_rho + (age - 1) * self.ramp
                rho = step_rho(rho, 0.0, self.clamp)[0].unsqueeze(-1)
                o_p = o_s if p_layout is layout else block_sparse_attention(q, k, v, p_layout, scale=scale)
                scaled = rho * o_p.float()
                base = (layer, step, keep, age)
                self.errors[base + ("native",)].append(_rel(scaled + p_res.float(), out_d))
                self.errors[base + ("float8_e4m3fn",)].append(_rel(scaled + dequantize_fp8(*p_fp8, torch.float32), out_d))
                self.errors[base + ("none",)].append(_rel(scaled, out_d))
                self.errors[base + ("step",)].append(_rel(rho * o_s.float() + p_res.float(), out_d))
            rho, res = cache_statistics(out_d, lse_d, o_s, lse_s, use_rho=True, residual_dtype=q.dtype)
            past.append((step, layout, rho, res, quantize_fp8(res)))

    # ------------------------------------------------------------------ reading the table
    def layers(self) -> list[int]:
        return sorted(self.shapes)

    def mean_density(self, keep: float) -> float:
        d = self.density.get(keep)
        return float(sum(d) / len(d)) if d else float("nan")

    def table(self):
        """{(layer, step, keep, age, variant): mean error} over the calibration samples."""
        return {key: sum(v) / len(v) for key, v in self.errors.items()}

    def entry_bytes(self, layer: int, residual: str) -> int:
        """Bytes of rho + R for one layer (all its calls), R stored as ``residual`` ("native":
        in the attention's dtype, as the calls were)."""
        return sum(statistics_bytes(shape, None if residual == "none" else
                                    torch.float8_e4m3fn if residual == "float8_e4m3fn" else dtype)
                   for shape, dtype in self.shapes[layer].values())
