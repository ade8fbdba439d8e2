"""What a generation did, step by step: :class:`StepRecord` per denoising step, :class:`Stats`
for the whole generation (``handle.stats()``)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from rettn.core.config import STEP_KINDS, RettnConfig, Schedule
from rettn.errors import ScheduleWarning


@dataclass
class StepRecord:
    step: int
    kind: str
    forwards: int = 0  # transformer calls in this step (CFG branches called separately count)
    dense_calls: int = 0  # attention calls of sparse-eligible layers that ran dense in a non-dense step
    densities: list = field(default_factory=list)  # one 0-d tensor per call that ran sparse
    dense_reasons: dict = field(default_factory=dict)  # why calls ran dense: reason -> count
    models: list = field(default_factory=list)  # the transformers that ran this step (their labels)

    @property
    def sparse_calls(self) -> int:
        """Attention calls that ran the sparse kernel (sparse or cache steps)."""
        return len(self.densities)

    @property
    def density_sum(self) -> float:
        return float(torch.stack([d.double().cpu() for d in self.densities]).sum()) if self.densities else 0.0

    @property
    def density(self) -> float | None:
        return self.density_sum / self.sparse_calls if self.sparse_calls else None


@dataclass
class Stats:
    """What a generation did, step by step. ``print(stats)`` shows a table."""

    family: str
    num_inference_steps: int | None
    steps: list[StepRecord]
    cached_bytes: int
    peak_cached_bytes: int
    generations: int
    # what backend=None chose for each call shape of the process (rettn.backend_choices()): the
    # kernel, each candidate's time and why others were skipped; empty until a measured choice
    backend_choices: list = field(default_factory=list)
    # the dense attention kernels rettn itself ran at dense steps (and for the dense output of a
    # cache step that caches nothing): kernel name ("sdpa:cudnn", "sdpa:cpu", "diffusers:<backend>"
    # for the model's own non-SDPA backend) -> calls. Calls rettn leaves to the model (masks,
    # cross-attention, skip_layers, short sequences) are not counted here.
    dense_kernels: dict = field(default_factory=dict)
    # sparse vs dense attention cost per call shape, measured on the first calls of each kind
    # (rettn.core.pays.ShapeCost: shape, dense_s, sparse_s, slower, fallback); empty until a shape
    # has had both dense and sparse steps
    step_costs: list = field(default_factory=list)
    # never silently dense: why this generation's schedule has no sparse step (slower than dense)
    # and what to change, or None (ScheduleCheck; the same text was warned as a ScheduleWarning)
    schedule_warning: str | None = None
    # the adaptive schedule (warmup / refresh_interval "auto"): each measured refresh
    # (rettn.core.adaptive.Refresh: step, age, error, worst, worst_layer, calls, interval chosen)
    # and a one-line summary of what it did; empty / None with a fixed schedule
    refreshes: list = field(default_factory=list)
    adaptive: str | None = None

    @property
    def slower_shapes(self) -> list:
        """The measured shapes where a sparse step costs more than the dense call it replaces."""
        return [c for c in self.step_costs if c.slower]

    @property
    def dense_backend(self) -> str | None:
        """The dense kernel(s) rettn's dense steps ran, most used first (None: no dense call)."""
        names = sorted(self.dense_kernels, key=lambda n: -self.dense_kernels[n])
        return ", ".join(names) if names else None

    def counts(self) -> dict:
        out = {"dense": 0, "cache": 0, "sparse": 0}
        for s in self.steps:
            out[s.kind] += 1
        return out

    def kinds(self) -> list[str]:
        return [s.kind for s in self.steps]

    def kind_letters(self) -> str:
        """The step kinds as one string: ``"DDCSSCSS"`` (dense, cache, sparse)."""
        return "".join(s.kind[0].upper() for s in self.steps)

    def mean_density(self) -> float | None:
        """Mean counted density over the attention calls that ran sparse (text rows included)."""
        n = sum(s.sparse_calls for s in self.steps)
        return sum(s.density_sum for s in self.steps) / n if n else None

    def __str__(self) -> str:
        c = self.counts()
        d = self.mean_density()
        lines = [
            f"rettn stats: family={self.family} steps={len(self.steps)} "
            f"(dense {c['dense']}, cache {c['cache']}, sparse {c['sparse']}), "
            f"mean counted density {'-' if d is None else f'{d:.4f}'}, "
            f"cached {self.cached_bytes / 2**20:.1f} MiB (peak {self.peak_cached_bytes / 2**20:.1f} MiB), "
            f"dense kernel {self.dense_backend or '-'}",
            "step | kind   | forwards | sparse calls | dense calls | density",
        ]
        lines[1:1] = [f"sparse vs dense: {c.describe()}" for c in self.step_costs]
        if self.schedule_warning:
            lines.insert(1, "schedule: NO SPARSE STEP: " + self.schedule_warning.removeprefix("rettn: "))
        if self.adaptive:
            lines.insert(1, "schedule: " + self.adaptive)
        refreshes = {r.step: r for r in self.refreshes}
        if refreshes:
            lines[-1] += " | stale statistics (adaptive)"
        for s in self.steps:
            dens = "-" if s.density is None else f"{s.density:.4f}"
            r = refreshes.get(s.step)
            lines.append(f"{s.step:4d} | {s.kind:6s} | {s.forwards:8d} | {s.sparse_calls:12d} | "
                         f"{s.dense_calls:11d} | {dens}" + (f" | {r}" if r else ""))
        return "\n".join(lines)


def _counts(kinds) -> dict:
    return {k: list(kinds).count(k) for k in STEP_KINDS}


def schedule_problem(config: RettnConfig, kinds: list[str], num_steps: int | None) -> str | None:
    """Why a generation whose steps are ``kinds`` is slower than dense, with what to change; None
    when it has a sparse step (or no step at all). ``num_steps`` is the step count the schedule
    was resolved for (None: a bare transformer whose schedule followed the timestep's progress,
    ``kinds`` are the steps recorded so far)."""
    c = _counts(kinds)
    if not kinds or c["sparse"]:
        return None
    n = len(kinds) if num_steps is None else num_steps
    if config.is_auto:
        return (f"rettn: the adaptive schedule ran {len(kinds)} steps as {c['dense']} dense, {c['cache']} cache and 0 "
                f"sparse (warmup={config.warmup!r}, refresh_interval={config.refresh_interval!r}, tolerance="
                f"{config.tolerance:g}): " + (
                    "the cached statistics never stayed under the tolerance, so every step after the dense floor "
                    "refreshed them (slower than dense). handle.stats().refreshes has the measured errors: raise "
                    "tolerance above them, or use more steps" if c["cache"] else
                    f"{n} step(s) are all dense floor or dense tail") + " (or run this model without rettn)")
    every = c["cache"] >= 2 and all(k == "cache" for k in kinds[kinds.index("cache"):] if k != "dense")
    why = ("a cache step every step after warm-up: each costs a dense step plus a sparse pass, so this is "
           "slower than without rettn" if every else
           "every step is dense (rettn only adds its bookkeeping)" if not c["cache"] else
           "no step is left for a sparse step: the cache steps cost a dense step plus a sparse pass, slower "
           "than without rettn")
    fields = f"warmup={config.warmup!r}, refresh_interval={config.refresh_interval!r}" + (
        f", dense_final={config.dense_final!r}" if config.dense_final else "")
    gen = f"this {n}-step generation" if num_steps is not None else f"the {n} steps seen of this generation"
    head = (f"rettn: the schedule of {gen} resolves to {c['dense']} dense, {c['cache']} cache and 0 sparse "
            f"steps ({fields}): {why}. ")
    if num_steps is None:
        return head + (
            "The step count is unknown (a bare transformer): fractions were read against the timestep's "
            "progress. Give rettn the step count (RettnConfig(num_inference_steps=N) or "
            "handle.set_num_inference_steps(N)), or write refresh_interval as a step count >= 2 and a "
            "smaller warmup (e.g. warmup=2, refresh_interval=3)")
    warm = config._steps(config.warmup, n)
    interval = max(2, config._steps(config.refresh_interval, n))
    for w in sorted({warm, min(warm, max(1, n // 4)), 1, 0}, reverse=True):
        s = Schedule(w, interval, n).kinds(n)
        if w <= warm and "sparse" in s:
            d = _counts(s)
            return head + (
                f"Change it: e.g. warmup={w}, refresh_interval={interval}" + (", dense_final=0" if config.dense_final
                                                                              else "")
                + f" (step counts) give {d['dense']} dense, {d['cache']} cache and {d['sparse']} sparse steps at "
                f"{n} steps; or use more steps (num_inference_steps; --steps on the command line)")
    return head + f"{n} step(s) leave no room for a sparse step: run this model without rettn (handle.remove())"


class ScheduleCheck:
    """Never silently dense: a generation whose schedule has no sparse step warns once (a
    :class:`~rettn.errors.ScheduleWarning`) per step count and resolved schedule, and
    :attr:`note` holds the same text for ``stats()``.

    With the step count known, the schedule is judged when the generation starts. Without it (a
    bare transformer: the schedule follows the timestep's progress) the recorded steps are
    judged: as soon as two cache steps follow each other with no sparse step yet (the interval
    resolved to every step), and at the end of the generation (``stats()``, or the next
    generation's start). An adaptive schedule (``"auto"``) is judged from its steps at its last
    step (step count known) or at the end of the generation."""

    def __init__(self):
        self.warned: set = set()  # (step count or None, dense, cache) already warned
        self.config = None
        self.known = True  # this generation's step count was known at its start
        self.note: str | None = None
        self.num_steps: int | None = None
        self._warned_now = False  # this generation warned already

    def start(self, config, num_steps: int | None, records: list):
        """A new generation: judge the last one (when it ran without a step count), then resolve
        and judge this one's schedule. Returns the Schedule (None without a step count)."""
        self.finish(records)
        self.config, self.known, self.note, self._warned_now = config, num_steps is not None, None, False
        self.num_steps = num_steps
        if config.is_auto:  # decided as it runs (core.adaptive): judged from the steps it took
            self.known = False
            return None
        if num_steps is None:
            return None
        schedule = config.schedule(num_steps)
        self._judge(schedule.kinds(num_steps), num_steps)
        return schedule

    def add(self, records: list, record):
        """Append a new step's record; two cache steps in a row and no sparse step yet warn now."""
        records.append(record)
        if self.config is not None and self.config.is_auto and record.step + 1 == self.num_steps:
            self._judge([r.kind for r in records], self.num_steps)  # the adaptive schedule's last step
            return
        if not self.known and not self.config.is_auto and not self._warned_now and record.kind == "cache" \
                and len(records) > 1 \
                and records[-2].kind == "cache" and not any(r.kind == "sparse" for r in records):
            self._judge([r.kind for r in records], None)

    def finish(self, records: list) -> str | None:
        """The note on the generation ``records`` holds (judged from them without a step count,
        or with an adaptive schedule)."""
        if not self.known and self.config is not None and records:
            self._judge([r.kind for r in records], self.num_steps if self.config.is_auto else None)
        return self.note

    def _judge(self, kinds: list, num_steps: int | None):
        note = schedule_problem(self.config, kinds, num_steps)
        self.note = note
        if note is None or self._warned_now:
            return
        every = not self.known and kinds[-2:] == ["cache", "cache"]  # the interval resolved to every step
        key = (num_steps, "every") if every else (num_steps, len(kinds), kinds.count("dense"), kinds.count("cache"))
        self._warned_now = True
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(note, ScheduleWarning, stacklevel=5)
