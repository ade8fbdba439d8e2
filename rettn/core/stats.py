"""What a generation did, step by step: :class:`StepRecord` per denoising step, :class:`Stats`
for the whole generation (``handle.stats()``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
        for s in self.steps:
            dens = "-" if s.density is None else f"{s.density:.4f}"
            lines.append(f"{s.step:4d} | {s.kind:6s} | {s.forwards:8d} | {s.sparse_calls:12d} | "
                         f"{s.dense_calls:11d} | {dens}")
        return "\n".join(lines)
