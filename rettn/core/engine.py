"""The Re-ttention engine: step tracking, per-layer statistics, and the sparse / cache / dense
decision for each attention call.

Cache step (dense): ``O_d, lse_d = attention_with_lse``; ``O_s, lse_s`` = sparse attention with
lse on the same layout; ``rho = exp(lse_s - lse_d)``, ``R = O_d - rho * O_s``; output ``O_d``.
Sparse step: output ``rho_c * O_s + R_c`` with ``rho_c`` ramped by ``ramp`` after each sparse
step (the first sparse step after a cache step uses it unchanged), clamped to (0, 1].
State is kept per (layer, CFG branch[, batch row]) and reset at every new generation.

The engine's pieces live in their own modules (``state``, ``stats``, ``tracking``,
``observers``); their public names are importable from here too.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import torch

from rettn.core import attend_op
from rettn.core.adaptive import AutoSchedule, stale_error
from rettn.core.config import FP8_RESIDUAL, RESIDUAL_DTYPES, RettnConfig, Schedule
from rettn.core.layouts import select_layout
from rettn.core.observers import Observer, ObserverSet, RegionTimer
from rettn.core.pays import SLOWER, CostMeter, ShapeCost
from rettn.core.residual import ResidualStore, dequantize_fp8, quantize_fp8
from rettn.core.state import CacheEntry, CallInfo, LayerSlot, check_budget, not_finite_error, residual_form
from rettn.core.stats import ScheduleCheck, Stats, StepRecord
from rettn.core.tracking import StepTracker, progress_kind
from rettn.errors import UnsupportedError
from rettn.ops.attention import (
    backend_choices,
    cache_step_attention,
    dense_attention,
    dense_backend,
    sparse_step_attention,
)
from rettn.ops.layout import BlockSparseLayout
from rettn.ops.reference import RHO_FLOOR  # noqa: F401  (re-exported: rho is kept in [RHO_FLOOR, 1])


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


def _no_mask_hook(*call):
    raise UnsupportedError("rettn's engine takes an attention mask only through apply_rettention's integration "
                           "(which tells key padding it can express as blocks from other masks); without it, run "
                           "masked attention yourself")


class Engine:
    """Holds one patched model's Re-ttention state; the integration calls :meth:`attend`."""

    def __init__(self, config: RettnConfig, n_layers: int, family: str, rising_timesteps: bool = False,
                 timestep_end: float = 0.0):
        self.config = config
        self.n_layers = n_layers
        # how many layers keep R in each form (None: the config's): the budget check's sum
        self._layer_forms = Counter(config.layer_residual.get(i) for i in range(n_layers))
        self.family = family
        self.tracker = StepTracker(rising=rising_timesteps)
        self.timestep_end = timestep_end
        self.num_steps: int | None = config.num_inference_steps
        self.schedule: Schedule | None = None
        self.auto: AutoSchedule | None = None  # the adaptive schedule of this generation ("auto" fields)
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
        self.observers = ObserverSet()  # tools watching this engine (profiler, quality harness)
        # dense attention kernels rettn ran this generation (name -> calls: stats().dense_backend)
        self.dense_kernels: dict[str, int] = {}
        self._dense_names: dict = {}  # (device, dtype, q shape, Sk) -> the chooser's dense kernel
        # runs the model's own dense attention when it is a diffusers backend other than torch's
        # SDPA: (q, k, v, scale, backend name) -> out (set by the integration)
        self.dense_hook = None
        # the output of a masked call under torch.compile: (q, k, v, mask, scale, info) -> out
        self.mask_hook = _no_mask_hook
        self.costs = CostMeter(config.fallback_when_slower)  # sparse vs dense per call shape (pays.py)
        self.schedule_check = ScheduleCheck()  # never silently dense: warns on a schedule with no sparse step

    # ----------------------------------------------------------------- observers
    def observe(self, observer: Observer) -> Observer:
        """Register ``observer`` (a :class:`~rettn.core.observers.Observer`): its hooks are called
        from now on. Returns it; registering it again changes nothing."""
        return self.observers.add(observer)

    def unobserve(self, observer: Observer):
        """Stop calling ``observer``'s hooks (nothing happens when it is not registered)."""
        self.observers.remove(observer)

    def region(self, name: str, device):
        """A region of this step, timed by the observers that time regions (a no-op otherwise)."""
        regions = self.observers.regions
        if not regions:
            return contextlib.nullcontext()
        if len(regions) == 1:
            return regions[0].region(self.step_kind(), name, device)
        return self.observers.region(self.step_kind(), name, device)

    # ----------------------------------------------------------------- lifecycle
    def reset(self):
        """Forget all statistics and step history (the next call starts a new generation)."""
        self.tracker.reset()
        self.clear_cache()
        self.records, self.schedule_check.note, self.auto = [], None, None
        self.kind = "dense"
        self.peak_bytes = 0
        self.dense_kernels = {}
        self.costs.reset()
        self.step, self.branch, self.model, self.generations = -1, 0, None, 0
        for slot in self.slots.values():
            slot.pending.clear()
            slot.calls, slot.sparse, slot.dense = 0, 0, {}

    def start_generation(self, num_steps: int | None):
        self.generations += 1
        self.clear_cache()
        self.dense_kernels = {}
        self.model = None
        if num_steps is not None:
            self.num_steps = num_steps
        self._progress_state = {}
        # no step count (a bare transformer): the schedule's fractions are read against the
        # timestep's progress instead (see tracking.progress_kind); no sparse step warns (ScheduleCheck)
        self.schedule = self.schedule_check.start(self.config, self.num_steps, self.records)
        self.auto = AutoSchedule(self.config, self.num_steps) if self.config.is_auto else None
        self.records = []

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
            if self.auto is not None:
                self.auto.restart()
        self.model = model
        self.step, self.branch = step, branch
        if not self.records or self.records[-1].step != step:
            self.kind = self._step_kind(step, progress)
            self.schedule_check.add(self.records, StepRecord(step, self.kind))
        else:
            self.kind = self.records[-1].kind
        record = self.records[-1]
        record.forwards += 1
        if model not in record.models:
            record.models.append(model)

    def _step_kind(self, step: int, progress: float | None) -> str:
        if self.auto is not None:
            return self.auto.kind(step)
        if self.schedule is not None:
            return self.schedule.kind(step)
        return progress_kind(self.config, self._progress_state, step, progress)

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
            layers, record = sorted({layer for layer, ok in checks if not bool(ok)}), self.records[-1]
            raise not_finite_error(layers, record.step, record.kind, self.branch)
        self.costs.flush()

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
            slot.residual = self.config.layer_residual.get(layer)
            slot.token = attend_op.new_token(self, slot)
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
        if self.auto is not None:
            self.auto.decide()  # the last cache step's measure too
        return Stats(self.family, self.num_steps, list(self.records), self.cached_bytes,
                     self.peak_bytes, self.generations, backend_choices(), dict(self.dense_kernels),
                     self.costs.report(), self.schedule_check.finish(self.records),
                     list(self.auto.refreshes) if self.auto else [], self.auto.summary() if self.auto else None)

    # ----------------------------------------------------------------- selection
    def layout(self, q, k, info: CallInfo, keep: float | None = None) -> BlockSparseLayout:
        """The blocks this engine's config selects for one call (``keep`` overrides the config's:
        what ``rettn calibrate``'s probe uses to try several keeps on the same call)."""
        cfg = self.config if keep is None else self.config.replace(keep=keep)
        return select_layout(cfg, self.static_layouts, self.family, q, k, info)

    # ----------------------------------------------------------------- memory
    def _check_budget(self, q, info: CallInfo):
        """Would the statistics of every sparse layer for the CFG branches seen so far (the
        current one included) fit the budget? Checked at every call from step 0 on (dense warm-up
        included): an error at the first call, not an out-of-memory crash mid-generation."""
        if self.config.max_cache_bytes is not None:
            branches = self.branch + 1 if isinstance(self.branch, int) else max(
                1, self.records[-1].forwards) if self.records else 1
            check_budget(self.config, self._layer_forms, q, self.n_layers, branches)

    # ----------------------------------------------------------------- the call
    def attend(self, q, k, v, scale, info: CallInfo, mask=None):
        """Output for this attention call, or None to let the model's own attention run (a
        skipped layer, a sequence shorter than ``min_seq_len``: static facts of the call).

        Everything else is decided by :meth:`decide`; under torch.compile through the custom op
        ``rettn::attend`` (:mod:`rettn.core.attend_op`), so that the step kind, the layer's
        state and the CFG branch are never guarded on: one graph serves all of them. ``mask``
        (compiled calls only): an attention mask whose values decide, passed on to ``mask_hook``
        inside the op."""
        slot = info.slot if info.slot is not None else self.slot(info.layer)
        if slot.skip or q.shape[2] < self.config.min_seq_len:
            if not torch.compiler.is_compiling():
                for observer in self.observers.calls:
                    observer.on_call(q, k, v, scale, info)
            slot.pending.append(SKIPPED if slot.skip else SHORT)
            return None
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        if torch.compiler.is_compiling() and not grad:  # (no autograd through the op: traced as Python)
            return attend_op.call(slot, q, k, v, scale, info, mask)
        if mask is not None:
            return self.mask_hook(q, k, v, mask, scale, info)
        return self.decide(q, k, v, scale, info, slot)

    def decide(self, q, k, v, scale, info: CallInfo, slot: LayerSlot, mask=None):
        """The output of a call rettn handles, by this step's kind: dense (rettn's fastest dense
        kernel, or the model's own backend named by ``info.dense_with``), cache or sparse. Runs
        eagerly (inside ``rettn::attend`` when compiled): it reads and updates the layer's state.
        A ``mask`` goes to ``mask_hook`` (the integration's masked path, which comes back here)."""
        if mask is not None:
            return self.mask_hook(q, k, v, mask, scale, info)
        for observer in self.observers.calls:
            observer.on_call(q, k, v, scale, info)
        kind = self.kind
        self._check_budget(q, info)
        if kind == "dense":
            slot.pending.append(DENSE_STEP)
            return self.costs.run("dense", q, k, lambda: self._dense(q, k, v, scale, info))
        if self.costs.fallback and self.costs.falls_back(q, k):  # measured slower at this shape: dense
            slot.pending.append(SLOWER)
            return self._dense(q, k, v, scale, info)
        key = (self.branch, info.row) if not info.call else (self.branch, info.row, info.call)
        entry = slot.entries.get(key)
        if kind == "sparse" and (entry is None or entry.shape != tuple(q.shape)):
            kind = "cache"  # no statistics for this call (new shape or branch): refresh them
        if kind == "cache":
            out, new = self._cache_step(q, k, v, scale, info, slot.residual)
            if self.auto is not None and entry is not None and entry.shape == new.shape and out is not None:
                self.auto.measure(slot.layer, stale_error(self, q, k, v, scale, entry, new, out))
            slot.entries[key] = entry = new
            if out is None:  # nothing cached (use_rho and R off): the dense output of the step
                out = self._dense(q, k, v, scale, info)
            slot.pending.append((entry.density, self._finite(out, entry.finite)))
            return out
        return self.costs.run("sparse", q, k, lambda: self._sparse_step(q, k, v, scale, info, slot, entry))

    def _dense(self, q, k, v, scale, info: CallInfo):
        """Dense attention for a call rettn handles: the kernel rettn's dense chooser measures
        fastest (CPU: PyTorch's CPU flash kernel, as the model's SDPA), or the model's own
        backend when it is not torch's SDPA (``info.dense_with``, run by ``dense_hook``)."""
        with self.region("attention", q.device):
            if info.dense_with is not None and self.dense_hook is not None:
                out, name = self.dense_hook(q, k, v, scale, info.dense_with), f"diffusers:{info.dense_with}"
            else:
                out = dense_attention(q, k, v, scale=scale)
                name = None
        if name is None:
            sig = (q.device, q.dtype, tuple(q.shape), k.shape[2])
            name = self._dense_names.get(sig)
            if name is None:
                name = dense_backend(q, k)
                if name != "auto":  # known once the first call chose (CUDA: measured)
                    self._dense_names[sig] = name
        self.dense_kernels[name] = self.dense_kernels.get(name, 0) + 1
        return out

    def _cache_step(self, q, k, v, scale, info, override: str | None = None):
        cfg = self.config
        with self.region("selection", q.device):
            layout = self.layout(q, k, info)
            density = layout.density_tensor()
        rho = residual = finite = scale_r = None
        form = residual_form(self.config, override)
        use_residual = form != "none"
        if cfg.use_rho or use_residual:
            fp8 = form == FP8_RESIDUAL
            rdt = q.dtype if fp8 else RESIDUAL_DTYPES.get(form, q.dtype)
            with self.region("attention", q.device):  # one fused pass, or dense + statistics (chooser)
                out_d, rho, residual, finite = cache_step_attention(
                    q, k, v, layout, scale=scale, use_rho=cfg.use_rho, use_residual=use_residual,
                    residual_dtype=rdt, check_finite=cfg.check_finite, backend=cfg.backend)
            if residual is not None and fp8:
                with self.region("bookkeeping", q.device):
                    residual, scale_r = quantize_fp8(residual)
                    rdt = residual.dtype
            if residual is not None and cfg.residual_device is not None:
                with self.region("bookkeeping", q.device):  # offload (rho, 1/D of R, stays)
                    residual = self.residuals.put(residual, rdt)
        else:
            out_d = None  # plain sparse: decide() runs the dense attention of the step
        return out_d, CacheEntry(layout, density, rho, residual, tuple(q.shape), finite, scale_r)

    def _sparse_step(self, q, k, v, scale, info, slot: LayerSlot, entry: CacheEntry):
        cfg = self.config
        if cfg.reselect == "step" and cfg.pattern == "topk":
            with self.region("selection", q.device):
                layout = self.layout(q, k, info)
                density = layout.density_tensor()
        else:
            layout, density = entry.layout, entry.density
        # the n-th sparse step after the cache step uses rho_c + (n - 1) * ramp: the entry's rho
        # advances by one ramp after each use (no step counter in the computation, so a compiled
        # graph serves every sparse step); the kernel writes the advanced rho itself.
        rho, residual = entry.rho, self._residual(entry, q)
        on_device = rho is not None and rho.device == q.device
        with self.region("attention", q.device):  # rescale, residual, ramp, clamp, check: one kernel
            out, rho_next, finite = sparse_step_attention(
                q, k, v, layout, rho, residual, scale=scale, ramp=cfg.ramp if on_device else 0.0,
                clamp_rho=cfg.clamp_rho, check_finite=cfg.check_finite, backend=cfg.backend)
        if rho is not None and cfg.ramp:
            entry.rho = rho_next if on_device else rho + cfg.ramp
        slot.pending.append((density, finite))
        for observer in self.observers.sparse_outputs:
            observer.on_sparse_output(q, k, v, scale, info, out)
        return out

    def _residual(self, entry: CacheEntry, q):
        """The entry's R on q's device in q's dtype: offloaded R back (prefetched on CUDA), fp8 R
        dequantized."""
        residual = entry.residual
        if residual is not None and residual.device != q.device:
            with self.region("bookkeeping", q.device):
                residual = self.residuals.fetch(residual, q.device)
        if entry.residual_scale is not None:
            with self.region("bookkeeping", q.device):
                residual = dequantize_fp8(residual, entry.residual_scale, q.dtype)
        return residual

    def _finite(self, out, flag=None):
        """A 0-d bool tensor (no sync here): does ``out`` hold only finite values? ``flag`` is
        that answer when a kernel already wrote it (the fused steps). None when the check is off
        or the model's own attention produced the output."""
        if out is None or not self.config.check_finite:
            return None
        return torch.isfinite(out).all() if flag is None else flag


__all__ = [
    "Engine", "CallInfo", "CacheEntry", "LayerSlot", "Stats", "StepRecord", "StepTracker",
    "Observer", "ObserverSet", "RegionTimer",
    "DENSE_STEP", "SKIPPED", "SHORT", "CROSS", "MASK", "DROPOUT_CAUSAL", "NOT_SELF", "UNSUPPORTED_ARGS",
    "NOT_REACHED", "RHO_FLOOR", "SLOWER", "CostMeter", "ShapeCost",
]
