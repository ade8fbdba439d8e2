"""Clocks of the profiler: per-step wall time of a transformer (forward hooks) and the engine's
regions (attention, selection, bookkeeping) keyed by denoising step."""

from __future__ import annotations

import contextlib
import inspect
import time

import torch

from rettn.core.engine import RegionTimer, StepTracker
from rettn.errors import UsageError

REGIONS = ("attention", "selection", "bookkeeping")


def mark(device: torch.device):
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def elapsed(start, end) -> float:
    if isinstance(start, float):
        return end - start
    return start.elapsed_time(end) / 1e3


def sync(device: torch.device):
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
        step, start = self.step, mark(device)
        try:
            yield
        finally:
            self.marks.append((step, kind, name, start, mark(device)))

    def _resolve(self):
        if any(not isinstance(m[3], float) for m in self.marks):
            torch.cuda.synchronize()
        resolved = [(step, kind, name, elapsed(a, b)) for step, kind, name, a, b in self.marks]
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


def timestep_of(signature, args, kwargs) -> float:
    try:
        bound = signature.bind_partial(*args, **kwargs).arguments
    except TypeError:
        bound = dict(kwargs)
    t = bound.get("timestep")
    if t is None:
        raise UsageError("the transformer was called without a `timestep`; the profiler needs it to count steps")
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
        self.tracker.on_forward(timestep_of(self.signature, args, kwargs))
        if self.timer is not None:
            self.timer.step = self.tracker.step
        self._start = mark(self.device)

    def _post(self, module, args, output):
        self.calls.append((self.tracker.step, self._start, mark(self.device)))

    def remove(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def steps(self) -> dict:
        """{step: (seconds, calls)}, in step order."""
        sync(self.device)
        out: dict = {}
        for step, a, b in self.calls:
            s, n = out.get(step, (0.0, 0))
            out[step] = (s + elapsed(a, b), n + 1)
        return dict(sorted(out.items()))

