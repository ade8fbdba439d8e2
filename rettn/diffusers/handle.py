"""The handle apply_rettention returns: which module plays which role (plan), statistics,
describe(), reset() and remove(); its hooks take the step from the pipeline and fold each call's
statistics."""

from __future__ import annotations

import inspect
import numbers
import warnings

import torch

from rettn.core import engine as eng
from rettn.core.config import RettnConfig
from rettn.errors import ConfigError, InputError, NotReachedError, UnsupportedModelError
from rettn.core.engine import Engine, Stats
from rettn.diffusers import families as fam
from rettn.diffusers.calls import CallFacts
from rettn.diffusers.processor import (
    OTHER,
    RettnProcessor,
    attention_modules,
    diffusers_attention,
    masked_or_dense,
    set_processor,
    wrapper_class,
)
from rettn.diffusers.steps import (
    PipelineSteps,
    attach_context_listener,
    detach_context_listener,
)


def plan(model, family: fam.Family, config: RettnConfig) -> list[dict]:
    """What rettn will do with each attention module of ``model``: its role (self, cross,
    other or auto), its self-attention layer index and its static decision."""
    rows, layer = [], 0
    for name, module in attention_modules(model).items():
        role = "auto" if family.generic else (fam.classify(family, name) or "other")
        proc = module.processor
        proc = proc.original if isinstance(proc, RettnProcessor) else proc
        row = dict(module=name, processor=type(proc).__name__, role=role, layer=None)
        if role in ("self", "auto"):
            row["layer"] = layer
            row["decision"] = "dense: skip_layers" if layer in config.skip_layers else (
                "sparse-eligible" if role == "self" else "sparse-eligible when q and k lengths match")
            layer += 1
        elif role == "cross":
            row["decision"] = "sparse-eligible (sparse_cross_attention)" if config.sparse_cross_attention \
                else f"dense: {eng.CROSS}"
        else:
            row["decision"] = f"dense: {OTHER}"
        rows.append(row)
    return rows


# ---------------------------------------------------------------------- the handle
class RettnHandle:
    """Returned by :func:`apply_rettention`: ``stats()``, ``describe()``, ``reset()``, ``remove()``."""

    def __init__(self, models: list, pipeline, config: RettnConfig, families: list, preset: str | None = None):
        self.models = [m for _, m in models]
        self.labels = [label for label, _ in models]
        self.model = self.models[0]
        self.pipeline, self.config, self.preset = pipeline, config, preset
        self.families = families
        self.family = families[0]
        self.removed = False
        self.reached = False  # did any call reach the engine yet?
        self._checked_reach = False
        self.modules, self.original_processors, self._plans = {}, {}, []
        for i, model in enumerate(self.models):
            self._plans.append(plan(model, families[i], config))
        n_sparse = max(sum(1 for r in p if r["role"] in ("self", "auto") and r["layer"] not in config.skip_layers)
                       for p in self._plans)
        if not any(r["role"] in ("self", "auto") for p in self._plans for r in p):
            raise UnsupportedModelError(f"found no self-attention modules to sparsify in {type(self.model).__name__}")
        self.engine = Engine(config, n_sparse, self.family.name, rising_timesteps=self.family.timestep == "rising",
                             timestep_end=self.family.timestep_end)
        self.engine.dense_hook = diffusers_attention  # dense steps of a model on a non-SDPA backend
        # a masked call under torch.compile, decided inside rettn::attend on the real mask
        self.engine.mask_hook = lambda *call: masked_or_dense(self, *call)
        # Slots: self-attention layers are numbered 0.. in model order (what skip_layers refers
        # to); the other modules follow them; a second transformer's slots follow the first's.
        next_id = 0
        self.layers = []
        for i, (model, rows) in enumerate(zip(self.models, self._plans)):
            modules = attention_modules(model)
            ordered = [r for r in rows if r["layer"] is not None] + [r for r in rows if r["layer"] is None]
            for r in ordered:
                key = self._key(i, r["module"])
                module = modules[r["module"]]
                slot = self.engine.slot(r["layer"] if r["layer"] is not None else -1, id=next_id, model=i,
                                        name=key, skip=r["layer"] in config.skip_layers)
                r["slot"] = next_id
                next_id += 1
                orig = module.processor
                self.modules[key] = module
                self.original_processors[key] = orig
                kind = r["role"]
                if kind in ("self", "auto", "cross"):
                    self.layers.append(key)
                set_processor(module, wrapper_class(type(orig))(orig, self, r["layer"], kind, key, slot, i))
        self.calls = CallFacts(self.families)  # what the processors read of each transformer call
        self._signatures = [inspect.signature(m.forward) for m in self.models]
        self._steps = PipelineSteps(pipeline) if pipeline is not None else None
        self._listeners = [attach_context_listener(m) for m in self.models]
        self._hooks = []
        for i, model in enumerate(self.models):
            # step tracking reads the timestep's value: it runs eagerly even in a compiled model
            pre = torch.compiler.disable(lambda mod, args, kwargs, i=i: self._pre_forward(i, mod, args, kwargs))
            self._hooks.append(model.register_forward_pre_hook(pre, with_kwargs=True))
            # after each call: fold its statistics into stats(), raise on a non-finite output
            self._hooks.append(model.register_forward_hook(torch.compiler.disable(self._post_forward)))

    def _key(self, model_index: int, name: str) -> str:
        return name if len(self.models) == 1 else f"{self.labels[model_index]}.{name}"

    # ------------------------------------------------------------------ per forward
    def _num_steps(self):
        sched = getattr(self.pipeline, "scheduler", None)
        timesteps = getattr(sched, "timesteps", None)
        if timesteps is not None and len(timesteps) > 0:
            return len(timesteps)
        return None

    def _pre_forward(self, index, module, args, kwargs):
        try:
            bound = self._signatures[index].bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = dict(kwargs)
        family = self.families[index]
        t = next((bound[name] for name in (family.timestep_arg, "timestep", "timesteps", "t")
                  if bound.get(name) is not None), None)
        if t is None:
            raise InputError(f"rettn needs the transformer's `{family.timestep_arg}` argument to track steps; "
                             f"{type(module).__name__}.forward got none")
        t = float(t.float().max()) if isinstance(t, torch.Tensor) else float(t)
        listener = self._listeners[index]
        position = None if self._steps is None else self._steps.position(t, listener and listener.context)
        engine = self.engine
        if position is None:
            engine.on_forward(t, self._num_steps, model=index)
        else:
            step, branch, new_generation, num_steps = position
            engine.tracker.on_forward(t)  # kept in step, for a later fallback
            engine.begin_forward(step, branch, new_generation, num_steps, model=index)
        self.calls.forward_args = {
            "text_len": fam.text_length(family, bound),
            "grid": fam.read_grid(family, module, bound),
        }

    def _post_forward(self, module, args, output):
        self.engine.flush()
        if not self._checked_reach:
            self._check_reach()

    def _check_reach(self):
        """After the first transformer call: an error if no attention call reached the engine."""
        slots = [s for s in self.engine.slots.values() if s.layer >= 0]
        called = [s for s in slots if s.calls]
        if not called:
            return  # no self-attention module ran yet (e.g. a cache skipped the blocks)
        self._checked_reach = True
        missed = [s.name for s in called if eng.NOT_REACHED in s.dense]
        if not self.reached:
            procs = sorted({type(self.original_processors[s.name]).__name__ for s in called})
            raise NotReachedError(
                f"rettn reached none of the attention calls of {type(self.model).__name__}: its processors "
                f"{procs} compute attention without torch's scaled_dot_product_attention (or diffusers' "
                "native dispatch), so nothing could run sparse. Remove rettn (handle.remove()); see "
                "rettn.describe(model) for what each module does"
            )
        if missed:
            warnings.warn(
                f"rettn: {len(missed)} self-attention module(s) never reached the engine and run dense "
                f"(first: {missed[0]}); handle.describe() lists them", RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ public
    def stats(self) -> Stats:
        """Per step of the last generation: dense / cache / sparse, counted density, cached bytes,
        and why calls ran dense."""
        return self.engine.stats()

    def describe(self) -> "Description":
        """Every attention module of the patched model(s): its role, layer, and what its calls
        did so far (sparse, or dense with the reason)."""
        self.engine.flush()
        rows = []
        for i, p in enumerate(self._plans):
            for r in p:
                slot = self.engine.slots[r["slot"]]
                rows.append(dict(model=self.labels[i], module=r["module"], processor=r["processor"],
                                 role=r["role"], layer=r["layer"], decision=r["decision"], calls=slot.calls,
                                 sparse=slot.sparse, dense=dict(slot.dense)))
        kernels = self.engine.dense_kernels
        dense = ", ".join(sorted(kernels, key=lambda n: -kernels[n])) or None
        auto = self.engine.auto
        return Description(rows, [f.name for f in self.families], self.preset, dense_backend=dense,
                           schedule=auto.summary() if auto is not None else None)

    def reset(self):
        """Drop cached statistics and step history; the next call starts a new generation."""
        self.engine.reset()
        if self._steps is not None:
            self._steps.reset()

    def set_num_inference_steps(self, n: int):
        """For a bare transformer: the number of denoising steps that schedule fractions refer to."""
        if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n <= 0:
            raise ConfigError(f"num_inference_steps must be a positive integer, got {n!r}")
        self.engine.num_steps = int(n)
        self.reset()

    def remove(self):
        """Restore the exact original processors and remove the hooks. Safe to call twice, and
        after an exception in the middle of a generation."""
        if self.removed:
            return
        self.removed = True
        for hook in self._hooks:
            hook.remove()
        for model in self.models:
            detach_context_listener(model)
        if self._steps is not None:
            self._steps.close()
        for key, proc in self.original_processors.items():
            if self.modules[key].processor is not proc:
                set_processor(self.modules[key], proc)
        self.engine.reset()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def __repr__(self):
        state = "removed" if self.removed else f"{len(self.layers)} attention modules patched"
        models = ", ".join(type(m).__name__ for m in self.models)
        return f"RettnHandle({models}, family={self.family.name}, {state})"


class Description:
    """What :meth:`RettnHandle.describe` / :func:`describe` return: ``rows`` (one dict per
    attention module) and a readable table (``print(description)``)."""

    def __init__(self, rows: list[dict], families: list[str], preset: str | None = None,
                 dense_backend: str | None = None, schedule: str | None = None):
        self.rows, self.families, self.preset = rows, families, preset
        self.dense_backend = dense_backend  # the kernel(s) rettn's dense steps ran (None: none yet)
        self.schedule = schedule  # what the adaptive schedule did (None: a fixed schedule)

    def dense_unseen(self) -> list[str]:
        """Modules that rettn targeted but whose calls never reached the engine."""
        return [r["module"] for r in self.rows if eng.NOT_REACHED in r.get("dense", {})]

    def __str__(self):
        lines = [f"rettn: family {', '.join(dict.fromkeys(self.families))}"
                 + (f", preset {self.preset}" if self.preset else "")
                 + (f", dense steps on {self.dense_backend}" if self.dense_backend else "")]
        if self.schedule:
            lines.append("schedule: " + self.schedule)
        lines.append("model | module | processor | role | layer | decision | calls | sparse | dense (reason: calls)")
        for r in self.rows:
            dense = "; ".join(f"{k}: {v}" for k, v in r.get("dense", {}).items()) or "-"
            layer = "-" if r["layer"] is None else str(r["layer"])
            lines.append(f"{r['model']} | {r['module']} | {r['processor']} | {r['role']} | {layer} | "
                         f"{r['decision']} | {r.get('calls', '-')} | {r.get('sparse', '-')} | {dense}")
        return "\n".join(lines)

    __repr__ = __str__


# ---------------------------------------------------------------------- entry points
