"""Runs to time: a bare transformer over a timestep schedule, or a whole pipeline; one timed run
(dense or with rettn) gives a :class:`RunRecord` of :class:`StepTime` rows."""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field

import torch

from rettn.core.observers import Observer
from rettn.tools import args as common
from rettn.tools.profile.clocks import REGIONS, StepClock, StepRegionTimer, sync


@dataclass
class StepTime:
    """One denoising step of a timed run: its wall time, transformer calls and engine regions."""

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
    """One timed generation: its total time and its steps."""

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
        common.call_pipeline(self.pipe, **kwargs)


@dataclass
class Capture(Observer):
    """The first self-attention call of the longest sequence that reached the engine (an engine
    observer: ``engine.observe(capture)``)."""

    shape: tuple | None = None
    dtype: torch.dtype | None = None
    device: torch.device | None = None
    scale: float | None = None
    info: object = None
    transposed: bool = False  # q is a (B, S, H, D) buffer seen as (B, H, S, D)

    def on_call(self, q, k, v, scale, info):
        if info.kind == "self" and (self.shape is None or q.shape[2] > self.shape[2]):
            self.shape, self.dtype, self.device = tuple(q.shape), q.dtype, q.device
            self.scale, self.info = scale, info
            self.transposed = q.stride(1) < q.stride(2)


def timed_run(runner, num_steps: int, device: torch.device, config=None, capture: Capture | None = None,
              seed: int = 0, dense=None) -> RunRecord:
    """One generation of ``num_steps`` steps, dense (``config=None``) or with rettn; ``dense``: a
    context manager factory around the run (the dense baseline's SDPA backend: the model's own
    SDPA calls, and those rettn leaves to the model, run on it)."""
    from rettn.diffusers import apply_rettention

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
        sync(device)
        with dense() if dense is not None else contextlib.nullcontext():
            t0 = time.perf_counter()
            runner.run(num_steps, seed)
            sync(device)
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
        steps.append(StepTime(step, kind, seconds, calls, reg))
    return RunRecord("rettn" if config is not None else "dense", total, steps, peak,
                     stats.mean_density() if stats is not None else None,
                     stats.counts() if stats is not None else None)

