"""The Re-ttention engine: step tracking, per-layer statistics, and the sparse / cache / dense
decision for each attention call.

Cache step (dense): ``O_d, lse_d = attention_with_lse``; ``O_s, lse_s`` = sparse attention with
lse on the same layout; ``rho = exp(lse_s - lse_d)``, ``R = O_d - rho * O_s``; output ``O_d``.
Sparse step: output ``rho_c * O_s + R_c`` with ``rho_c`` ramped by ``ramp`` after each sparse
step (the first sparse step after a cache step uses it unchanged), clamped to (0, 1].
State is kept per (layer, CFG branch[, batch row]) and reset at every new generation.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from rettn.core.config import RESIDUAL_DTYPES, RettnConfig, Schedule
from rettn.core.residual import ResidualStore
from rettn.errors import ConfigError, MemoryBudgetError, NumericalError
from rettn.ops import selection
from rettn.ops.attention import (
    attention_with_lse,
    backend_choices,
    cache_step_attention,
    sparse_step_attention,
)
from rettn.ops.layout import BlockSparseLayout
from rettn.ops.reference import RHO_FLOOR  # noqa: F401  (re-exported: rho is kept in [RHO_FLOOR, 1])


def _bytes(n: float) -> str:
    """2.00 GiB, 12.0 MiB, 900 bytes."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} bytes"


class RegionTimer:
    """Accumulates wall time per (step kind, region) when profiling is on.

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


@dataclass
class CacheEntry:
    """Statistics of one (layer, branch) from its last cache step."""

    layout: BlockSparseLayout
    density: torch.Tensor  # 0-d: counted density of the layout (a tensor: no device sync per call)
    rho: torch.Tensor | None  # (B, H, Sq) float32; advanced by the ramp after each sparse step
    residual: torch.Tensor | None  # (B, H, Sq, D)
    shape: tuple
    finite: torch.Tensor | None = None  # 0-d bool from the cache step's kernel: O_dense all finite

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.rho, self.residual) if t is not None)


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
            f"cached {self.cached_bytes / 2**20:.1f} MiB (peak {self.peak_cached_bytes / 2**20:.1f} MiB)",
            "step | kind   | forwards | sparse calls | dense calls | density",
        ]
        for s in self.steps:
            dens = "-" if s.density is None else f"{s.density:.4f}"
            lines.append(f"{s.step:4d} | {s.kind:6s} | {s.forwards:8d} | {s.sparse_calls:12d} | "
                         f"{s.dense_calls:11d} | {dens}")
        return "\n".join(lines)


class StepTracker:
    """Guesses the denoising step and CFG branch from the timesteps of the transformer's calls
    (for bare transformers; with a pipeline the integration reads the pipeline's own signals).

    A call whose timestep is higher than the previous one (or the first call) starts a new
    generation; an equal timestep is another call of the same step (Wan calls cond, then uncond);
    a lower one is the next step. ``rising=True`` is for models whose timestep grows as denoising
    goes on (Z-Image passes ``(1000 - t) / 1000``): the comparisons flip.
    """

    def __init__(self, rising: bool = False):
        self.rising = rising
        self.reset()

    def reset(self):
        self.prev_t: float | None = None
        self.first_t: float | None = None
        self.step = -1
        self.branch = 0
        self.generations = 0

    def on_forward(self, t: float) -> bool:
        """Advance on a transformer call with timestep ``t``; True when a new generation starts."""
        if self.rising:
            t = -t
        new_gen = self.prev_t is None or t > self.prev_t
        if new_gen:
            self.first_t = t
        if new_gen:
            self.generations += 1
            self.step, self.branch = 0, 0
        elif t == self.prev_t:
            self.branch += 1
        else:
            self.step += 1
            self.branch = 0
        self.prev_t = t
        return new_gen

    def progress(self, end: float = 0.0) -> float | None:
        """How far the last call is along the denoising trajectory, from its timestep: 0 at the
        generation's first call, 1 at the timestep ``end`` (where denoising ends: 0 for
        decreasing timesteps; Z-Image's rising ones end at 1). None before any call."""
        if self.prev_t is None:
            return None
        end = -end if self.rising else end
        span = self.first_t - end
        return 0.0 if span <= 0 else min(1.0, max(0.0, (self.first_t - self.prev_t) / span))

    def __repr__(self):
        return f"StepTracker(step={self.step}, branch={self.branch}, generations={self.generations})"


class LayerSlot:
    """One attention module's state: its cache entries by (CFG branch, batch row), and what its
    calls did.

    The integration gives each wrapped processor its slot, so an attention call reaches its
    statistics through an object rather than by its layer number: under torch.compile a layer
    number read in the traced code is a constant guarded on, and every block compiled separately
    (diffusers' regional compilation) would recompile once per layer.

    ``id`` numbers the slots of a handle (the keys of :attr:`Engine.cache`); ``layer`` is the
    index among its model's self-attention layers (what ``skip_layers`` refers to); ``model``
    which patched transformer it belongs to (0, or 1 for a pipeline's ``transformer_2``).
    """

    def __init__(self, layer: int, skip: bool, id: int | None = None, model: int = 0, name: str = ""):
        self.layer, self.skip = layer, skip
        self.id = layer if id is None else id
        self.model, self.name = model, name
        self.entries: dict[tuple, CacheEntry] = {}
        # this forward's calls: (0-d density tensor, finite flag) for calls that ran sparse, a
        # reason string for calls that ran dense
        self.pending: list = []
        self.calls = 0  # every call of this module, folded from pending by Engine.flush
        self.sparse = 0
        self.dense: dict[str, int] = {}  # reason -> count

    def __repr__(self):
        return (f"LayerSlot(id={self.id}, layer={self.layer}, model={self.model}, skip={self.skip}, "
                f"entries={list(self.entries)})")


# Why an attention call ran dense (the reasons handle.stats() and handle.describe() show).
DENSE_STEP = "dense step (schedule)"
SKIPPED = "skip_layers"
SHORT = "sequence shorter than min_seq_len"
CROSS = "cross-attention"
MASK = "attention mask rettn cannot express as blocks"
DROPOUT_CAUSAL = "dropout or causal attention"
NOT_SELF = "queries and keys differ in length (not self-attention)"
UNSUPPORTED_ARGS = "arguments rettn does not handle (e.g. GQA)"
NOT_REACHED = "not reached: the processor computed attention without torch's SDPA"


@dataclass
class CallInfo:
    """What the integration knows about one attention call."""

    layer: int | None = None  # index among the sparse-eligible layers (or give ``slot``)
    kind: str = "self"  # "self" or "cross"
    dense_spans: list = field(default_factory=list)
    grid: tuple | None = None
    text_first: int = 0  # tokens before the video range (frame_window's video_start)
    row: int | None = None  # batch row when a key-padding mask split the batch
    slot: LayerSlot | None = None  # the layer's state (the integration passes it)
    key_spans: list = field(default_factory=list)  # key ranges kept dense when queries are a part of the keys
    call: int = 0  # which attention call of the processor call this is (Mochi: one per sample)


class Engine:
    """Holds one patched model's Re-ttention state; the integration calls :meth:`attend`."""

    def __init__(self, config: RettnConfig, n_layers: int, family: str, rising_timesteps: bool = False,
                 timestep_end: float = 0.0):
        self.config = config
        self.n_layers = n_layers
        self.family = family
        self.tracker = StepTracker(rising=rising_timesteps)
        self.timestep_end = timestep_end
        self.num_steps: int | None = config.num_inference_steps
        self.schedule: Schedule | None = None
        self._progress_state: dict = {}  # the timestep-progress schedule's memory (num_steps unknown)
        self.step = -1  # this generation's step and CFG branch (set by begin_forward)
        self.branch = 0
        self.model = None  # which patched transformer the current forward belongs to
        self.generations = 0
        self.slots: dict[int, LayerSlot] = {}
        self.static_layouts: dict[tuple, BlockSparseLayout] = {}
        self.records: list[StepRecord] = []
        self.kind = "dense"  # this step's kind, set by on_forward (outside any compiled region)
        self.peak_bytes = 0
        self.residuals = ResidualStore(config.residual_device)  # where R lives between steps
        self.timer: RegionTimer | None = None  # set by the profiler
        # set by the quality harness: (step, layer, relative error vs dense) of sparse-step outputs
        self.error_log: list | None = None

    def region(self, name: str, device):
        """Time a region of this step when profiling (a no-op otherwise)."""
        if self.timer is None:
            return contextlib.nullcontext()
        return self.timer.region(self.step_kind(), name, device)

    # ----------------------------------------------------------------- lifecycle
    def reset(self):
        """Forget all statistics and step history (the next call starts a new generation)."""
        self.tracker.reset()
        self.clear_cache()
        self.records = []
        self.kind = "dense"
        self.peak_bytes = 0
        self.step, self.branch, self.model, self.generations = -1, 0, None, 0
        for slot in self.slots.values():
            slot.pending.clear()
            slot.calls, slot.sparse, slot.dense = 0, 0, {}

    def start_generation(self, num_steps: int | None):
        self.generations += 1
        self.clear_cache()
        self.records = []
        self.model = None
        if num_steps is not None:
            self.num_steps = num_steps
        self._progress_state = {}
        # no step count (a bare transformer): the schedule's fractions are read against the
        # timestep's progress instead (see _kind_from_progress)
        self.schedule = self.config.schedule(self.num_steps) if self.num_steps is not None else None

    def on_forward(self, timestep: float, num_steps_fn=None, model: int = 0):
        """A transformer call, its step guessed from the timestep (bare transformers)."""
        new_gen = self.tracker.on_forward(timestep)
        self.begin_forward(self.tracker.step, self.tracker.branch, new_gen,
                           (num_steps_fn() if num_steps_fn else None) if new_gen else None,
                           progress=self.tracker.progress(self.timestep_end), model=model)

    def begin_forward(self, step: int, branch, new_generation: bool, num_steps: int | None = None,
                      progress: float | None = None, model: int = 0):
        """A transformer call at denoising ``step`` for CFG ``branch`` (any hashable: 0, 1 or a
        pipeline's ``cache_context`` name). ``new_generation`` clears all state first;
        ``num_steps`` is the generation's step count when known, ``progress`` (0..1 along the
        denoising trajectory) is used when it is not."""
        self.flush()
        if new_generation:
            self.start_generation(num_steps)
        if self.model is not None and model != self.model:
            # another transformer takes over (Wan 2.2's low-noise expert): the one that ran
            # before does not come back in this generation, so its statistics are dropped
            for slot in self.slots.values():
                if slot.model == self.model:
                    slot.entries.clear()
        self.model = model
        self.step, self.branch = step, branch
        if not self.records or self.records[-1].step != step:
            self.kind = self._step_kind(step, progress)
            self.records.append(StepRecord(step, self.kind))
        else:
            self.kind = self.records[-1].kind
        record = self.records[-1]
        record.forwards += 1
        if model not in record.models:
            record.models.append(model)

    def _step_kind(self, step: int, progress: float | None) -> str:
        if self.schedule is not None:
            return self.schedule.kind(step)
        return self._kind_from_progress(step, progress)

    def _kind_from_progress(self, step: int, progress: float | None) -> str:
        """The schedule when the number of steps is unknown: fractions (warm-up, refresh
        interval, dense tail) are fractions of the denoising progress read from the timestep;
        step counts stay step counts."""
        cfg, st = self.config, self._progress_state
        p = 0.0 if progress is None else progress
        warm, final = cfg.warmup, cfg.dense_final
        if (step < warm) if isinstance(warm, int) else (p < warm - 1e-9):
            return "dense"
        if isinstance(final, float) and final > 0 and p >= 1.0 - final - 1e-9:
            return "dense"
        last = st.get("last_cache")
        interval = cfg.refresh_interval
        due = last is None or (
            step - last[0] >= interval if isinstance(interval, int) else p - last[1] >= interval - 1e-9)
        if due:
            st["last_cache"] = (step, p)
            return "cache"
        return "sparse"

    def flush(self):
        """Move the calls of the last forward into its step record and the slots' totals. The
        attention calls only append to their layer's ``pending`` list (no shared counters they
        would have to read: under torch.compile those would be guarded on and recompile every
        step or layer)."""
        self.peak_bytes = max(self.peak_bytes, self.cached_bytes)
        checks = []
        for slot in self.slots.values():
            if slot.pending and self.records:
                record = self.records[-1]
                for item in slot.pending:
                    slot.calls += 1
                    if isinstance(item, str):
                        slot.dense[item] = slot.dense.get(item, 0) + 1
                        record.dense_reasons[item] = record.dense_reasons.get(item, 0) + 1
                        if record.kind != "dense" and item not in (DENSE_STEP, CROSS):
                            record.dense_calls += 1
                    else:
                        slot.sparse += 1
                        record.densities.append(item[0])
                        if item[1] is not None:
                            checks.append((slot.layer, item[1]))
            slot.pending.clear()
        if checks and not bool(torch.stack([ok.to(checks[0][1].device) for _, ok in checks]).all()):
            self._raise_not_finite(sorted({layer for layer, ok in checks if not bool(ok)}))

    def _raise_not_finite(self, layers):
        record = self.records[-1]
        raise NumericalError(
            f"rettn: the attention output of layer(s) {layers} at step {record.step} ({record.kind} step, CFG "
            f"branch {self.branch}) holds NaN or inf. Usual causes: the model's activations "
            "overflowed before attention (fp16: run in bfloat16 or float32; dense attention is NaN there "
            "too), NaN/inf in the inputs (latents, embeddings), or residual_dtype='float16' with "
            "attention outputs beyond 65504 (use 'bfloat16'). check_finite=False turns this check off."
        )

    def step_kind(self) -> str:
        return self.kind

    def slot(self, layer: int, id: int | None = None, model: int = 0, name: str = "",
             skip: bool | None = None) -> LayerSlot:
        """The state of the attention module numbered ``id`` (default: ``layer``), created on
        first use; ``layer`` is its index among its model's self-attention layers."""
        id = layer if id is None else id
        slot = self.slots.get(id)
        if slot is None:
            skip = layer in self.config.skip_layers if skip is None else skip
            slot = self.slots[id] = LayerSlot(layer, skip, id=id, model=model, name=name)
        return slot

    def note_dense(self, slot: LayerSlot, reason: str):
        """Record that a call of ``slot``'s module ran dense, and why (decided before the engine:
        cross-attention, a mask, a call that never reached torch's SDPA...)."""
        slot.pending.append(reason)

    def clear_cache(self):
        for slot in self.slots.values():
            slot.entries.clear()

    @property
    def cache(self) -> dict:
        """Every cache entry by (slot id, CFG branch, batch row) (a new dict; read-only view). With one
        patched transformer a slot's id is its self-attention layer index."""
        return {(slot.id, *key): entry for slot in self.slots.values() for key, entry in slot.entries.items()}

    @property
    def cached_bytes(self) -> int:
        return sum(e.nbytes for slot in self.slots.values() for e in slot.entries.values())

    def stats(self) -> Stats:
        self.flush()
        return Stats(self.family, self.num_steps, list(self.records), self.cached_bytes,
                     self.peak_bytes, self.generations, backend_choices())

    # ----------------------------------------------------------------- selection
    def _layout(self, q, k, info: CallInfo) -> BlockSparseLayout:
        cfg = self.config
        bs = cfg.block_size
        spans = info.dense_spans if cfg.dense_conditioning else []
        if info.kind == "cross" or cfg.pattern == "topk" or q.shape[2] != k.shape[2]:
            square = info.kind == "self" and q.shape[2] == k.shape[2]
            key_spans = info.key_spans if cfg.dense_conditioning else []
            return selection.topk(q, k, cfg.keep, block_q=bs, dense_spans=spans if square else (),
                                  dense_key_spans=key_spans)
        seq = q.shape[2]
        key = (cfg.pattern, seq, tuple(spans), info.grid, info.text_first, q.device)
        layout = self.static_layouts.get(key)
        if layout is None:
            if cfg.pattern == "window":
                layout = selection.window(seq, cfg.keep, bs, dense_spans=spans, device=q.device)
            else:
                if info.grid is None:
                    raise ConfigError(
                        f"pattern='frame_window' needs the token grid (frames, height, width), which "
                        f"rettn cannot read for this {self.family} call; use pattern='topk' or 'window'"
                    )
                layout = selection.frame_window(info.grid, cfg.keep, bs, video_start=info.text_first,
                                                seq_len=seq, device=q.device)
            self.static_layouts[key] = layout
        return layout

    # ----------------------------------------------------------------- memory
    def _entry_bytes(self, q) -> int:
        b, h, s, d = q.shape
        rdt = RESIDUAL_DTYPES.get(self.config.residual_dtype, q.dtype)
        per = 0
        if self.config.use_rho:
            per += b * h * s * 4
        if self.config.use_residual:
            per += b * h * s * d * torch.empty((), dtype=rdt).element_size()
        return per

    def _branches_seen(self) -> int:
        """CFG branches of this step seen so far (the current one included)."""
        if isinstance(self.branch, int):
            return self.branch + 1
        return max(1, self.records[-1].forwards) if self.records else 1

    def _check_budget(self, q, info: CallInfo):
        """Would the statistics for every sparse layer of the CFG branches seen so far fit the
        budget? Checked at every call from step 0 on (dense warm-up included): an error at the
        first call, not an out-of-memory crash mid-generation. Shapes and config only: no sync."""
        budget = self.config.max_cache_bytes
        if budget is None:
            return
        branches = self._branches_seen()
        need = self._entry_bytes(q) * self.n_layers * branches
        if need > budget:
            raise MemoryBudgetError(
                f"rettn would cache {_bytes(need)} of Re-ttention statistics (rho + R for "
                f"{self.n_layers} layers x {branches} CFG branch(es), attention "
                f"{tuple(q.shape)}), over max_cache_bytes={_bytes(budget)}. Options: "
                "residual_dtype='float16' or 'bfloat16', residual_device='cpu' (offload), "
                "skip_layers=[...] (fewer cached layers), use_residual=False, or a larger budget."
            )

    # ----------------------------------------------------------------- the call
    def attend(self, q, k, v, scale, info: CallInfo):
        """Output for this attention call, or None to let the model's own dense attention run."""
        cfg = self.config
        kind = self.kind
        slot = info.slot if info.slot is not None else self.slot(info.layer)
        if slot.skip or q.shape[2] < cfg.min_seq_len:
            slot.pending.append(SKIPPED if slot.skip else SHORT)
            return None
        self._check_budget(q, info)
        if kind == "dense":
            slot.pending.append(DENSE_STEP)
            return None
        key = (self.branch, info.row) if not info.call else (self.branch, info.row, info.call)
        entry = slot.entries.get(key) if kind == "sparse" else None
        if kind == "sparse" and (entry is None or entry.shape != tuple(q.shape)):
            kind = "cache"  # no statistics for this call (new shape or branch): refresh them
        if kind == "cache":
            out, entry = self._cache_step(q, k, v, scale, info)
            slot.entries[key] = entry
            slot.pending.append((entry.density, self._finite(out, entry.finite)))
            return out
        return self._sparse_step(q, k, v, scale, info, slot, entry)

    def _cache_step(self, q, k, v, scale, info):
        cfg = self.config
        with self.region("selection", q.device):
            layout = self._layout(q, k, info)
            density = layout.density_tensor()
        rho = residual = finite = None
        if cfg.use_rho or cfg.use_residual:
            rdt = RESIDUAL_DTYPES.get(cfg.residual_dtype, q.dtype)
            with self.region("attention", q.device):  # dense pass + one sparse pass with rho, R fused
                out_d, rho, residual, finite = cache_step_attention(
                    q, k, v, layout, scale=scale, use_rho=cfg.use_rho, use_residual=cfg.use_residual,
                    residual_dtype=rdt, check_finite=cfg.check_finite, backend=cfg.backend)
            if residual is not None and cfg.residual_device is not None:
                with self.region("bookkeeping", q.device):  # offload (rho, 1/D of R, stays)
                    residual = self.residuals.put(residual, rdt)
        else:
            out_d = None  # plain sparse: the model's own dense attention runs at cache steps
        return out_d, CacheEntry(layout, density, rho, residual, tuple(q.shape), finite)

    def _sparse_step(self, q, k, v, scale, info, slot: LayerSlot, entry: CacheEntry):
        cfg = self.config
        if cfg.reselect == "step" and cfg.pattern == "topk":
            with self.region("selection", q.device):
                layout = self._layout(q, k, info)
                density = layout.density_tensor()
        else:
            layout, density = entry.layout, entry.density
        # the n-th sparse step after the cache step uses rho_c + (n - 1) * ramp: the entry's rho
        # advances by one ramp after each use (no step counter in the computation, so a compiled
        # graph serves every sparse step); the kernel writes the advanced rho itself.
        rho, residual = entry.rho, entry.residual
        if residual is not None and residual.device != q.device:
            with self.region("bookkeeping", q.device):  # offloaded R back (prefetched on CUDA)
                residual = self.residuals.fetch(residual, q.device)
        on_device = rho is not None and rho.device == q.device
        with self.region("attention", q.device):  # rescale, residual, ramp, clamp, check: one kernel
            out, rho_next, finite = sparse_step_attention(
                q, k, v, layout, rho, residual, scale=scale, ramp=cfg.ramp if on_device else 0.0,
                clamp_rho=cfg.clamp_rho, check_finite=cfg.check_finite, backend=cfg.backend)
        if rho is not None and cfg.ramp:
            entry.rho = rho_next if on_device else rho + cfg.ramp
        slot.pending.append((density, finite))
        return self._log_error(q, k, v, scale, info, out)

    def _finite(self, out, flag=None):
        """A 0-d bool tensor (no sync here): does ``out`` hold only finite values? ``flag`` is
        that answer when a kernel already wrote it (the fused steps). None when the check is off
        or the model's own attention produced the output."""
        if out is None or not self.config.check_finite:
            return None
        return torch.isfinite(out).all() if flag is None else flag

    def _log_error(self, q, k, v, scale, info, out):
        """With ``error_log`` on: the relative L2 error of this sparse-step output against dense
        attention on the same inputs (costs a dense attention call; for the quality harness)."""
        if self.error_log is not None:
            dense, _ = attention_with_lse(q, k, v, scale=scale)
            err = (out.float() - dense.float()).norm() / dense.float().norm().clamp_min(1e-12)
            layer = info.slot.layer if info.slot is not None else info.layer
            self.error_log.append((self.step, layer, float(err)))
        return out
