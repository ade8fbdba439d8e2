"""Knowing the denoising step and the CFG branch of each transformer call.

With a pipeline, rettn reads the pipeline's own signals:

- the scheduler: each generation starts with ``scheduler.set_timesteps`` and each model
  evaluation ends with ``scheduler.step``; a :class:`SchedulerWatch` counts both (it wraps the
  two bound methods of that one scheduler object, nothing class- or process-wide, and puts them
  back when the last handle watching it is removed). The step is ``evaluations // order``
  (Heun and other second-order schedulers evaluate the model twice per step), the CFG branch the
  number of transformer calls since the last ``scheduler.step``;
- diffusers' ``cache_context``: pipelines wrap each call in ``with transformer.cache_context(
  "cond" / "uncond", step_index=..., num_inference_steps=...)``; a :class:`ContextListener`
  (a stateful hook in the transformer's diffusers ``HookRegistry``, which is how diffusers hands
  the context to its own caches) receives it. Its name is the branch, its step index (when the
  pipeline gives one) the step.

A bare transformer (no pipeline), or a pipeline whose loop does not use its scheduler, falls
back to the timestep guess of :class:`rettn.core.engine.StepTracker`.
"""

from __future__ import annotations

import math
import threading

from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import StateManager

_lock = threading.Lock()


class SchedulerWatch:
    """Counts one scheduler object's ``set_timesteps`` and ``step`` calls."""

    _watches: dict[int, "SchedulerWatch"] = {}

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.generation = 0  # set_timesteps calls seen
        self.evaluations = 0  # step() calls since the last set_timesteps
        self.refs = 0
        self._saved = {}
        for name in ("set_timesteps", "step"):
            # an instance attribute shadows the class's method for this object only
            self._saved[name] = scheduler.__dict__.get(name)
            setattr(scheduler, name, self._wrap(name, getattr(scheduler, name)))

    def _wrap(self, name, method):
        def wrapped(*args, **kwargs):
            out = method(*args, **kwargs)
            if name == "set_timesteps":
                self.generation += 1
                self.evaluations = 0
            else:
                self.evaluations += 1
            return out

        wrapped.__wrapped__ = method
        wrapped.__name__ = getattr(method, "__name__", name)
        wrapped.__doc__ = getattr(method, "__doc__", None)
        return wrapped

    @classmethod
    def acquire(cls, scheduler) -> "SchedulerWatch | None":
        if scheduler is None or not callable(getattr(scheduler, "step", None)) \
                or not callable(getattr(scheduler, "set_timesteps", None)):
            return None
        with _lock:
            watch = cls._watches.get(id(scheduler))
            if watch is None or watch.scheduler is not scheduler:
                watch = cls._watches[id(scheduler)] = cls(scheduler)
            watch.refs += 1
            return watch

    def release(self):
        with _lock:
            self.refs -= 1
            if self.refs > 0:
                return
            for name, saved in self._saved.items():
                if saved is None:
                    self.scheduler.__dict__.pop(name, None)
                else:
                    setattr(self.scheduler, name, saved)
            if self._watches.get(id(self.scheduler)) is self:
                del self._watches[id(self.scheduler)]

    @property
    def order(self) -> int:
        order = getattr(self.scheduler, "order", 1)
        return order if isinstance(order, int) and order >= 1 else 1

    def num_steps(self) -> int | None:
        """Denoising steps of this generation: the model evaluations the timesteps call for
        (after an img2img ``begin_index``), divided by the scheduler's order, rounded up
        (Heun's 2N - 1 evaluations are N steps)."""
        timesteps = getattr(self.scheduler, "timesteps", None)
        try:
            n = len(timesteps)
        except TypeError:
            return None
        begin = getattr(self.scheduler, "begin_index", None)
        n -= begin if isinstance(begin, int) and 0 <= begin < n else 0
        return math.ceil(n / self.order) if n > 0 else None


class ContextListener(ModelHook):
    """A stateful hook for diffusers' ``HookRegistry``: receives the ``cache_context`` a pipeline
    sets around each transformer call. Its forward callbacks pass everything through."""

    _is_stateful = True

    def __init__(self):
        super().__init__()
        listener = self

        class _Receiver(StateManager):  # _set_cache_context hands the context to StateManagers
            def set_context(self, context):
                listener.context = context

        self.context = None
        self.receiver = _Receiver(_NoState)

    def reset_state(self, module):
        self.context = None
        return module


class _NoState:
    def reset(self, *args, **kwargs):
        pass


HOOK_NAME = "rettn_step_context"


def attach_context_listener(model) -> ContextListener | None:
    """Register a :class:`ContextListener` on a diffusers model (None for other modules)."""
    if not hasattr(model, "cache_context"):
        return None
    registry = HookRegistry.check_if_exists_or_initialize(model)
    if registry.get_hook(HOOK_NAME) is not None:
        registry.remove_hook(HOOK_NAME, recurse=False)
    listener = ContextListener()
    registry.register_hook(listener, HOOK_NAME)
    return listener


def detach_context_listener(model):
    registry = getattr(model, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(HOOK_NAME) is not None:
        registry.remove_hook(HOOK_NAME, recurse=False)


class PipelineSteps:
    """Step and branch of each transformer call from a pipeline's scheduler and cache context.

    :meth:`position` returns ``(step, branch, new_generation, num_steps)``, or None when the
    pipeline gives no usable signal for this call (the caller then guesses from the timestep).
    """

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.watch: SchedulerWatch | None = None
        self.reset()
        self._current_watch()  # watch from now on: the next generation's set_timesteps is seen

    def reset(self):
        self.generation = None  # the watch's generation this source last saw
        self.evaluations = None
        self.calls_since_step = 0
        self.last_t = None

    def _current_watch(self) -> SchedulerWatch | None:
        scheduler = getattr(self.pipeline, "scheduler", None)
        if self.watch is None or self.watch.scheduler is not scheduler:  # the user swapped schedulers
            if self.watch is not None:
                self.watch.release()
            self.watch = SchedulerWatch.acquire(scheduler)
            if self.watch is not None and self.watch.generation == 0 and \
                    getattr(scheduler, "timesteps", None) is not None and self.watch.evaluations == 0:
                # first seen with its timesteps already set (swapped in before this generation)
                self.watch.generation = 1
        return self.watch

    def position(self, t: float, context=None):
        watch = self._current_watch()
        if watch is None or watch.generation == 0:
            return None
        moved = (watch.generation, watch.evaluations) != (self.generation, self.evaluations)
        if not moved and self.last_t is not None and t != self.last_t:
            # the timestep changed but the scheduler did not move: this loop does not step the
            # pipeline's scheduler, so its calls say nothing here
            return None
        new_generation = watch.generation != self.generation
        if moved:
            self.calls_since_step = 0
        else:
            self.calls_since_step += 1
        self.generation, self.evaluations, self.last_t = watch.generation, watch.evaluations, t
        order = watch.order
        step = watch.evaluations // order
        num_steps = watch.num_steps()
        if context is not None and getattr(context, "step_index", None) is not None:
            step = int(context.step_index) // order
            n = getattr(context, "num_inference_steps", None)
            if isinstance(n, int) and n > 0:
                num_steps = math.ceil(n / order)
        name = getattr(context, "name", None) if context is not None else None
        branch = name if name else self.calls_since_step
        return step, branch, new_generation, num_steps

    def close(self):
        if self.watch is not None:
            self.watch.release()
            self.watch = None
