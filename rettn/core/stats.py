"""What a generation did, step by step: :class:`StepRecord` per denoising step, :class:`Stats`
for the whole generation (``handle.stats()``)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from rettn.core.config import schedule_problem
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
        for s in self.steps:
            dens = "-" if s.density is None else f"{s.density:.4f}"
            lines.append(f"{s.step:4d} | {s.kind:6s} | {s.forwards:8d} | {s.sparse_calls:12d} | "
                         f"{s.dense_calls:11d} | {dens}")
        return "\n".join(lines)


class ScheduleCheck:
    """Never silently dense: a generation whose schedule has no sparse step warns once (a
    :class:`~rettn.errors.ScheduleWarning`) per step count and resolved schedule, and
    :attr:`note` holds the same text for ``stats()``.

    With the step count known, the schedule is judged when the generation starts. Without it (a
    bare transformer: the schedule follows the timestep's progress) the recorded steps are
    judged: as soon as two cache steps follow each other with no sparse step yet (the interval
    resolved to every step), and at the end of the generation (``stats()``, or the next
    generation's start)."""

    def __init__(self):
        self.warned: set = set()  # (step count or None, dense, cache) already warned
        self.config = None
        self.known = True  # this generation's step count was known at its start
        self.note: str | None = None
        self._warned_now = False  # this generation warned already

    def start(self, config, num_steps: int | None, records: list):
        """A new generation: judge the last one (when it ran without a step count), then resolve
        and judge this one's schedule. Returns the Schedule (None without a step count)."""
        self.finish(records)
        self.config, self.known, self.note, self._warned_now = config, num_steps is not None, None, False
        if num_steps is None:
            return None
        schedule = config.schedule(num_steps)
        self._judge(schedule.kinds(num_steps), num_steps)
        return schedule

    def add(self, records: list, record):
        """Append a new step's record; two cache steps in a row and no sparse step yet warn now."""
        records.append(record)
        if not self.known and not self._warned_now and record.kind == "cache" and len(records) > 1 \
                and records[-2].kind == "cache" and not any(r.kind == "sparse" for r in records):
            self._judge([r.kind for r in records], None)

    def finish(self, records: list) -> str | None:
        """The note on the generation ``records`` holds (judged from them without a step count)."""
        if not self.known and self.config is not None and records:
            self._judge([r.kind for r in records], None)
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
