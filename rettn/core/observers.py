"""Observers: how tools watch an engine without changing it.

A tool subclasses :class:`Observer`, overrides the hooks it needs and registers the instance with
``engine.observe(observer)`` (``engine.unobserve(observer)`` takes it off). Hooks see the engine's
inputs and outputs; what they return is ignored, and they must not modify the tensors they get.

- ``region(kind, name, device)``: a context manager around each timed region of a step (``kind``:
  the step kind, ``"dense"`` / ``"cache"`` / ``"sparse"``; ``name``: ``"selection"``,
  ``"attention"`` or ``"bookkeeping"``). :class:`RegionTimer` is the observer that times them.
- ``on_call(q, k, v, scale, info)``: every call that reaches ``Engine.attend``, before it runs
  (dense steps, skipped and short layers included).
- ``on_sparse_output(q, k, v, scale, info, out)``: the output of each sparse-step call (not cache
  or dense steps), after it is computed.

Only hooks a subclass overrides are called: an engine with no observers, or with observers that
do not time regions, pays nothing in :meth:`Engine.region`.
"""

from __future__ import annotations

import contextlib
import time

import torch

from rettn.errors import InputTypeError


class Observer:
    """Base class of engine observers: every hook is a no-op; override the ones you need."""

    def region(self, kind: str, name: str, device: torch.device):
        """A context manager around one region of a step (see the module docstring)."""
        return contextlib.nullcontext()

    def on_call(self, q, k, v, scale, info) -> None:
        """An attention call that reached ``Engine.attend``, before it runs."""

    def on_sparse_output(self, q, k, v, scale, info, out) -> None:
        """The output ``out`` of a sparse-step call on ``q, k, v``."""


def _overrides(observer: Observer, hook: str) -> bool:
    return getattr(type(observer), hook) is not getattr(Observer, hook)


@contextlib.contextmanager
def _nested(managers):
    with contextlib.ExitStack() as stack:
        for manager in managers:
            stack.enter_context(manager)
        yield


class ObserverSet:
    """An engine's observers, in registration order, and for each hook the ones that override it
    (tuples: empty when nobody listens, so the engine's check is one truth test)."""

    def __init__(self):
        self.all: tuple = ()
        self._index()

    def _index(self):
        self.regions = tuple(o for o in self.all if _overrides(o, "region"))
        self.calls = tuple(o for o in self.all if _overrides(o, "on_call"))
        self.sparse_outputs = tuple(o for o in self.all if _overrides(o, "on_sparse_output"))

    def add(self, observer: Observer) -> Observer:
        if not isinstance(observer, Observer):
            raise InputTypeError(
                f"observer must be a rettn.core.observers.Observer (subclass it and override its hooks), "
                f"got {type(observer).__name__}")
        if not any(o is observer for o in self.all):  # by identity: equal observers are still two
            self.all += (observer,)
            self._index()
        return observer

    def remove(self, observer: Observer):
        """Take ``observer`` off (nothing happens when it is not registered)."""
        self.all = tuple(o for o in self.all if o is not observer)
        self._index()

    def region(self, kind: str, name: str, device):
        """The regions of every observer that times them, nested in registration order."""
        if len(self.regions) == 1:
            return self.regions[0].region(kind, name, device)
        return _nested([o.region(kind, name, device) for o in self.regions])

    def __len__(self):
        return len(self.all)

    def __iter__(self):
        return iter(self.all)

    def __contains__(self, observer):
        return any(o is observer for o in self.all)


class RegionTimer(Observer):
    """Accumulates wall time per (step kind, region); register it with ``engine.observe(timer)``.

    CUDA: events recorded around each region, resolved (one sync) in :meth:`totals`; CPU:
    ``time.perf_counter``. Regions: ``selection``, ``attention`` (every attention kernel, the
    model's own dense attention included), ``bookkeeping`` (rho, R, ramp, residual moves).
    """

    def __init__(self):
        self.pending: list = []  # (kind, region, start, end) CUDA events
        self.seconds: dict = {}

    @contextlib.contextmanager
    def region(self, kind: str, name: str, device: torch.device):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.pending.append((kind, name, start, end))
        else:
            t = time.perf_counter()
            yield
            self.add(kind, name, time.perf_counter() - t)

    def add(self, kind: str, name: str, seconds: float):
        self.seconds[(kind, name)] = self.seconds.get((kind, name), 0.0) + seconds

    def totals(self) -> dict:
        if self.pending:
            torch.cuda.synchronize()
            for kind, name, start, end in self.pending:
                self.add(kind, name, start.elapsed_time(end) / 1e3)
            self.pending = []
        return dict(self.seconds)
