"""Does sparsity pay at this shape? The engine's cost meter.

A sparse step replaces a dense attention call by a sparse one (plus, at cache steps, statistics).
Whether that is faster depends on the sequence length and the device: on a CPU at ~1k tokens the
sparse kernels cost more than PyTorch's dense flash kernel. The engine therefore times a few
attention calls of each kind per call shape (q's shape, the keys' length, dtype, device): the
dense call of a dense step (:meth:`Engine._dense`) and the whole sparse-step call (selection when
it reselects, R moves, the sparse kernel with its rescale: everything sparsity changes). The
first call of each kind per shape is not timed (kernel choice, compilation), the next
``MEASURED_CALLS`` are; then the shape gets a verdict (:class:`ShapeCost`, medians) and nothing
more is timed for it.

When the sparse call is slower, rettn warns once per shape (:class:`rettn.errors.SlowerThanDenseWarning`),
``handle.stats()`` lists the shape, and with ``RettnConfig(fallback_when_slower=True)`` later
sparse and cache steps of that shape run dense (reason :data:`SLOWER` in the stats).

Clocks: CPU ``time.perf_counter`` (the ops are synchronous); CUDA events, read in :meth:`flush`
(the engine's flush, once per transformer call, one host sync while a shape is being measured,
none after). The calls run inside ``rettn::attend`` under torch.compile, so timing them is eager.
"""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass

import torch

from rettn.errors import SlowerThanDenseWarning

MEASURED_CALLS = 3  # timed calls per (shape, kind), after SKIPPED_CALLS untimed ones
SKIPPED_CALLS = 1
SLOWER = "sparse measured slower than dense at this shape (fallback_when_slower)"


@dataclass
class ShapeCost:
    """The measured attention cost per call at one shape: ``dense_s`` (a dense step's dense call)
    and ``sparse_s`` (a sparse step's call), medians in seconds."""

    shape: tuple  # q's shape (B, H, S, D)
    keys: int  # the keys' sequence length
    device: str
    dense_s: float
    sparse_s: float
    fallback: bool = False  # later sparse / cache calls of this shape run dense

    @property
    def slower(self) -> bool:
        """Is a sparse step's call slower than the dense call it replaces?"""
        return self.sparse_s > self.dense_s

    def describe(self) -> str:
        verdict = "SLOWER than dense" if self.slower else "faster than dense"
        then = "; later sparse/cache calls of this shape run dense (fallback_when_slower)" if self.fallback else ""
        return (f"q {tuple(self.shape)} on {self.device}: sparse step {self.sparse_s * 1e3:.2f} ms vs dense "
                f"{self.dense_s * 1e3:.2f} ms per attention call: {verdict}{then}")


def _now(device: torch.device):
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(device))  # q's device, whichever device is current
        return event
    return time.perf_counter()


class CostMeter:
    """Times the first calls of each kind per shape and keeps the verdicts (see the module doc)."""

    def __init__(self, fallback: bool = False):
        self.fallback = fallback
        self.reset()

    def reset(self):
        self.seen: dict = {}  # (shape key, kind) -> calls seen
        self.samples: dict = {}  # (shape key, kind) -> seconds
        self.pending: list = []  # (shape key, kind, start event, end event): CUDA, read at flush
        self.verdicts: dict = {}  # shape key -> ShapeCost
        self.done: set = set()  # shape keys with a verdict (nothing more is timed)

    @staticmethod
    def key(q, k) -> tuple:
        return (str(q.device), q.dtype, tuple(q.shape), int(k.shape[2]))

    def run(self, kind: str, q, k, fn):
        """``fn()`` (the call of a ``"dense"`` or ``"sparse"`` step), timed while this shape and
        kind still need samples."""
        key = self.key(q, k)
        if key in self.done:
            return fn()
        n = self.seen.get((key, kind), 0)
        if n >= SKIPPED_CALLS + MEASURED_CALLS:
            return fn()
        self.seen[(key, kind)] = n + 1
        if n < SKIPPED_CALLS:
            return fn()
        start = _now(q.device)
        out = fn()
        end = _now(q.device)
        if isinstance(start, float):
            self._add(key, kind, end - start)
        else:
            self.pending.append((key, kind, start, end))
        return out

    def falls_back(self, q, k) -> bool:
        """Run this call dense: asked for, and sparse measured slower at its shape."""
        if not self.fallback or not self.verdicts:
            return False
        cost = self.verdicts.get(self.key(q, k))
        return cost is not None and cost.slower

    def flush(self):
        """Read the CUDA events of the calls timed so far (one sync), then judge."""
        if self.pending:
            self.pending[-1][3].synchronize()
            pending, self.pending = self.pending, []
            for key, kind, start, end in pending:
                self._add(key, kind, start.elapsed_time(end) / 1e3)

    def _add(self, key, kind: str, seconds: float):
        self.samples.setdefault((key, kind), []).append(seconds)
        dense, sparse = self.samples.get((key, "dense"), []), self.samples.get((key, "sparse"), [])
        if key in self.done or len(dense) < MEASURED_CALLS or len(sparse) < MEASURED_CALLS:
            return
        device, _, shape, keys = key
        cost = ShapeCost(shape, keys, device, statistics.median(dense), statistics.median(sparse))
        cost.fallback = self.fallback and cost.slower
        self.verdicts[key] = cost
        self.done.add(key)
        if cost.slower:
            then = ("running those calls dense from now on (fallback_when_slower=True)" if self.fallback else
                    "RettnConfig(fallback_when_slower=True) (--fallback-when-slower) runs them dense instead")
            warnings.warn(
                f"rettn: at attention shape {tuple(shape)} on {device}, a sparse step's attention call took "
                f"{cost.sparse_s * 1e3:.2f} ms, more than the dense call it replaces ({cost.dense_s * 1e3:.2f} ms): "
                f"sparsity makes these calls slower here; {then}", SlowerThanDenseWarning, stacklevel=2)

    def report(self) -> list:
        """Every shape measured so far (:class:`ShapeCost`), in the order they were judged."""
        return list(self.verdicts.values())
