"""One call makes a diffusers pipeline (or its transformer) sparse; one call undoes it.

How it plugs in, without monkeypatching classes:
- each targeted attention module's own processor is wrapped by a :class:`RettnProcessor` that
  keeps the original's call signature (``Attention.forward`` drops keyword arguments a processor
  does not declare; Wan, Flux and LTX pass them positionally) and delegates to it, so every
  family keeps its own projections, norms, RoPE and concatenation;
- while a handle lives, the core attention function the wrapped processors call
  (``F.scaled_dot_product_attention`` or diffusers' ``dispatch_attention_fn``) is a router: a
  call made inside a wrapped processor (tracked per thread) goes to the engine, any other call
  straight to the original (installed once, not per call: torch.compile cannot trace the lock);
- a forward pre-hook on the transformer tracks the denoising step from the timestep and reads
  the text length and token grid for that call; a forward hook folds the call's statistics and
  checks its outputs were finite. Both run eagerly in a compiled model.
``handle.remove()`` restores the exact original processor objects and functions and removes the
hooks.
"""

from __future__ import annotations

import inspect
import numbers
import threading

import torch
import torch.nn.functional as F

from . import families as fam
from .config import RettnConfig
from .engine import CallInfo, Engine, Stats

# ---------------------------------------------------------------------- routing of core calls
_local = threading.local()
_patch_lock = threading.Lock()
_patches: dict[tuple[int, str], list] = {}  # (id(namespace), name) -> [namespace, original, refcount]


def _active_frames() -> list:
    if not hasattr(_local, "frames"):
        _local.frames = []
    return _local.frames


def _namespace_set(ns, name, value):
    if isinstance(ns, dict):
        ns[name] = value
    else:
        setattr(ns, name, value)


def _namespace_get(ns, name):
    return ns[name] if isinstance(ns, dict) else getattr(ns, name)


def _acquire(ns, name, make_router):
    """Route ``ns.name`` through ``make_router(original)`` while at least one wrapped call runs."""
    key = (id(ns), name)
    with _patch_lock:
        slot = _patches.get(key)
        if slot is None:
            original = _namespace_get(ns, name)
            _namespace_set(ns, name, make_router(original))
            slot = _patches[key] = [ns, original, 0]
        slot[2] += 1


def _release(ns, name):
    key = (id(ns), name)
    with _patch_lock:
        slot = _patches[key]
        slot[2] -= 1
        if slot[2] == 0:
            _namespace_set(ns, name, slot[1])
            del _patches[key]


_CORE_PARAMS = ("attn_mask", "dropout_p", "is_causal", "scale")


def _core_args(args, kwargs):
    """(attn_mask, dropout_p, is_causal, scale, parallel_config) of an SDPA-like call, or None
    when it uses anything else (GQA, a backend argument rettn does not know, more positional
    arguments)."""
    if len(args) > len(_CORE_PARAMS):
        return None
    values = dict(zip(_CORE_PARAMS, args))
    parallel = None
    for name, value in kwargs.items():
        if name in _CORE_PARAMS and name not in values:
            values[name] = value
        elif name == "parallel_config":
            parallel = value
        elif name in ("enable_gqa", "attention_kwargs", "backend"):
            if value not in (None, False) and not (name == "attention_kwargs" and not value):
                return None
        else:
            return None
    return (values.get("attn_mask"), values.get("dropout_p", 0.0), values.get("is_causal", False),
            values.get("scale"), parallel)


def _context_parallel(parallel_config):
    """diffusers' ContextParallelConfig of a call when it spans more than one process, else None.
    Ring attention (each rank holds a shard of the keys) cannot give rettn a whole attention row
    to select blocks from and would need the lse merged across shards: an error, not a wrong
    result."""
    cp = getattr(parallel_config, "context_parallel_config", None)
    if cp is None or getattr(cp, "_world_size", 1) <= 1:
        return None
    if getattr(cp, "ring_degree", 1) > 1:
        raise NotImplementedError(
            f"rettn does not support ring attention (ContextParallelConfig(ring_degree={cp.ring_degree})): "
            "block selection needs every key of a row on one rank; use "
            "ContextParallelConfig(ulysses_degree=N) instead, or remove rettn for this run"
        )
    return cp


def _ulysses_attend(frame, query, key, value, attn_mask, dropout_p, is_causal, scale, parallel_config):
    """Ulysses sequence parallelism (diffusers' own all-to-all): each rank gets every token of a
    subset of heads, so rettn's per-head selection, rho and R run unchanged on its heads."""
    from diffusers.models.attention_dispatch import _templated_context_parallel_attention

    def forward_op(ctx, q, k, v, mask, p, causal, sc, enable_gqa=False, return_lse=False, _save_ctx=True,
                   _parallel_config=None):
        out = frame.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, p, causal, sc)
        if out is None:  # this call stays dense: torch's SDPA on the gathered sequence
            with frame.handle.engine.region("attention", q.device):
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     attn_mask=mask, dropout_p=p, is_causal=causal, scale=sc)
        return out.transpose(1, 2)

    return _templated_context_parallel_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                                 False, False, forward_op=forward_op, backward_op=None,
                                                 _parallel_config=parallel_config)


def _make_router(original, heads_second: bool):
    """A stand-in for ``original`` that hands the running wrapped call's core attention to the
    engine. ``heads_second``: SDPA's (B, H, S, D); otherwise dispatch_attention_fn's (B, S, H, D)."""

    def router(query, key, value, *args, **kwargs):
        frames = _active_frames()
        frame = frames[-1] if frames else None
        core = _core_args(args, kwargs) if frame is not None and not frame.used else None
        if core is not None:
            frame.used = True
            *core, parallel = core
            if not heads_second and _context_parallel(parallel) is not None:
                if frame.handle.engine.step_kind() == "dense":
                    return original(query, key, value, *args, **kwargs)
                return _ulysses_attend(frame, query, key, value, *core, parallel)
            if heads_second:
                out = frame.attend(query, key, value, *core)
            else:
                out = frame.attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), *core)
                out = None if out is None else out.transpose(1, 2)
            if out is not None:
                return out
            with frame.handle.engine.region("attention", query.device):  # the model's own attention
                return original(query, key, value, *args, **kwargs)
        return original(query, key, value, *args, **kwargs)

    router.__wrapped__ = original
    router.__name__ = getattr(original, "__name__", "router")
    return router


def _sdpa_router(original):
    return _make_router(original, heads_second=True)


def _dispatch_router(original):
    return _make_router(original, heads_second=False)


def _suffix_valid_lengths(mask, batch, seq_k):
    """For a key-padding mask (True = keep, padding at the end of the keys), the valid key count
    of each batch row; None for any other mask."""
    if mask.dtype != torch.bool or mask.shape[-1] != seq_k:
        return None
    m = mask.reshape(mask.shape[0], -1, seq_k)
    if m.shape[1] != 1 or m.shape[0] not in (1, batch):
        return None
    m = m[:, 0].expand(batch, seq_k)
    valid = m.sum(-1)
    expected = torch.arange(seq_k, device=m.device) < valid.unsqueeze(-1)
    if not torch.equal(m, expected) or int(valid.min()) == 0:
        return None
    return valid.tolist()


class _Frame:
    """One running wrapped processor call: routes its core attention call to the engine."""

    def __init__(self, handle: "RettnHandle", slot, kind: str):
        self.handle, self.slot, self.kind, self.used = handle, slot, kind, False

    def attend(self, q, k, v, attn_mask, dropout_p, is_causal, scale):
        if dropout_p or is_causal or q.dim() != 4 or k.shape[1] != q.shape[1]:
            return None
        if self.kind == "cross" and not self.handle.config.sparse_cross_attention:
            return None
        if self.kind == "self" and q.shape[2] != k.shape[2]:
            return None
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        info = self.handle._call_info(self.slot, self.kind, q.shape[2])
        engine = self.handle.engine
        if attn_mask is None:
            return engine.attend(q, k, v, scale, info)
        valid = _suffix_valid_lengths(attn_mask, q.shape[0], k.shape[2])
        if valid is None:
            return None  # a mask rettn cannot express as blocks: the model's dense attention runs
        if all(n == k.shape[2] for n in valid):
            return engine.attend(q, k, v, scale, info)
        if self.kind != "self" or engine.step_kind() == "dense":
            return None
        # Key padding at the end (HunyuanVideo's padded text, last): each batch row runs on its
        # first n tokens; its padded query rows (whose outputs never reach a real token) attend
        # the valid keys densely, as the masked original would.
        seq, outs = q.shape[2], []
        for b, n in enumerate(valid):
            qb, kb, vb = q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n]
            row_info = self.handle._call_info(self.slot, self.kind, n, row=b, padding=seq - n)
            head = engine.attend(qb[:, :, :n], kb, vb, scale, row_info)
            if head is None:  # this row stays dense (e.g. shorter than min_seq_len)
                head = F.scaled_dot_product_attention(qb[:, :, :n], kb, vb, scale=scale)
            tail = F.scaled_dot_product_attention(qb[:, :, n:], kb, vb, scale=scale)
            outs.append(torch.cat([head, tail], dim=2))
        return torch.cat(outs, 0)


_OWN_ATTRS = frozenset({"original", "handle", "layer", "kind", "name", "slot", "_routes"})


class RettnProcessor:
    """Wraps one attention module's processor; delegates every call to it unchanged."""

    def __init__(self, original, handle: "RettnHandle", layer: int, kind: str, name: str):
        self.original, self.handle, self.layer, self.kind, self.name = original, handle, layer, kind, name
        self.slot = handle.engine.slot(layer)  # the calls reach the layer's state through this
        call = type(original).__call__
        self._routes = []
        names = call.__code__.co_names if hasattr(call, "__code__") else ()
        if "dispatch_attention_fn" in names:
            self._routes.append((call.__globals__, "dispatch_attention_fn", _dispatch_router))
        if "scaled_dot_product_attention" in names:
            self._routes.append((F, "scaled_dot_product_attention", _sdpa_router))

    def _kind_for(self, args, kwargs) -> str:
        if self.kind != "auto":
            return self.kind
        ehs = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        return "self" if ehs is None else "cross"

    def __call__(self, attn, *args, **kwargs):
        handle = self.handle
        if handle.removed or not self._routes:
            return self.original(attn, *args, **kwargs)
        frames = _active_frames()
        frames.append(_Frame(handle, self.slot, self._kind_for(args, kwargs)))
        try:
            return self.original(attn, *args, **kwargs)
        finally:
            frames.pop()

    def __getattr__(self, item):  # behave like the wrapped processor for attribute reads
        if item in _OWN_ATTRS:
            raise AttributeError(item)
        return getattr(self.original, item)

    def __setattr__(self, item, value):
        # writes meant for the processor (diffusers' enable_parallelism sets _parallel_config,
        # set_attention_backend _attention_backend) go to the wrapped one
        if item in _OWN_ATTRS:
            object.__setattr__(self, item, value)
        else:
            setattr(self.original, item, value)

    def __repr__(self):
        return f"RettnProcessor({self.name}, layer={self.layer}, kind={self.kind}, wraps {type(self.original).__name__})"


_WRAPPER_CLASSES: dict[type, type] = {}


def _wrapper_class(original_cls: type) -> type:
    """A RettnProcessor subclass whose ``__call__`` shows the original's signature, so that
    ``Attention.forward`` passes it exactly the arguments the original would get."""
    cls = _WRAPPER_CLASSES.get(original_cls)
    if cls is None:
        def __call__(self, attn, *args, **kwargs):
            return RettnProcessor.__call__(self, attn, *args, **kwargs)

        __call__.__signature__ = inspect.signature(original_cls.__call__)
        cls = type(f"Rettn{original_cls.__name__}", (RettnProcessor,), {"__call__": __call__})
        _WRAPPER_CLASSES[original_cls] = cls
    return cls


# ---------------------------------------------------------------------- the handle
class RettnHandle:
    """Returned by :func:`apply_rettention`: ``stats()``, ``reset()``, ``remove()``."""

    def __init__(self, model, pipeline, config: RettnConfig, family: fam.Family):
        self.model, self.pipeline, self.config, self.family = model, pipeline, config, family
        self.removed = False
        self.modules = attention_modules(model)
        self.original_processors = {name: m.processor for name, m in self.modules.items()}
        targets = []
        for name in self.modules:
            kind = "auto" if family is fam.GENERIC else fam.classify(family, name)
            if kind is not None:
                targets.append((name, kind))
        if not targets:
            raise ValueError(f"found no self-attention modules to sparsify in {type(model).__name__}")
        self.layers = [n for n, _ in targets]
        n_self = sum(1 for _, kind in targets if kind in ("self", "auto"))
        self.engine = Engine(config, n_self - len([i for i in config.skip_layers if i < n_self]), family.name)
        # Self-attention layers are numbered 0.. in model order (what skip_layers refers to);
        # cross-attention layers follow them.
        counters = {"self": 0, "cross": n_self}
        for name, kind in targets:
            group = "cross" if kind == "cross" else "self"
            layer, counters[group] = counters[group], counters[group] + 1
            orig = self.original_processors[name]
            self.modules[name].set_processor(_wrapper_class(type(orig))(orig, self, layer, kind, name))
        # The core functions the wrapped processors call go through a router while this handle
        # lives (a pass-through outside wrapped calls), not swapped per call: swapping takes a
        # lock, which torch.compile cannot trace.
        self._routes = {}
        for name, _ in targets:
            for ns, fn_name, router in self.modules[name].processor._routes:
                self._routes[(id(ns), fn_name)] = (ns, fn_name, router)
        for ns, fn_name, router in self._routes.values():
            _acquire(ns, fn_name, router)
        self._forward_args: dict = {}
        self._signature = inspect.signature(model.forward)
        # step tracking reads the timestep's value: it runs eagerly even in a compiled model
        self._hook = model.register_forward_pre_hook(torch.compiler.disable(self._pre_forward), with_kwargs=True)
        # after each call: fold its statistics into stats(), raise on a non-finite output
        self._post_hook = model.register_forward_hook(torch.compiler.disable(self._post_forward))

    # ------------------------------------------------------------------ per forward
    def _num_steps(self):
        sched = getattr(self.pipeline, "scheduler", None)
        timesteps = getattr(sched, "timesteps", None)
        if timesteps is not None and len(timesteps) > 0:
            return len(timesteps)
        return None

    def _pre_forward(self, module, args, kwargs):
        try:
            bound = self._signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = dict(kwargs)
        t = bound.get("timestep")
        if t is None:
            raise ValueError(f"rettn needs the transformer's `timestep` argument to track steps; "
                             f"{type(module).__name__}.forward got none")
        t = float(t.float().max()) if isinstance(t, torch.Tensor) else float(t)
        self.engine.on_forward(t, self._num_steps)
        self._forward_args = {
            "text_len": fam.text_length(self.family, bound),
            "grid": fam.read_grid(self.family, module, bound),
        }

    def _post_forward(self, module, args, output):
        self.engine.flush()

    def _call_info(self, slot, kind: str, seq: int, row=None, padding: int = 0) -> CallInfo:
        """Dense spans (text), grid and video start for an attention call over ``seq`` tokens;
        ``padding`` text tokens were cut from the end of this row's sequence."""
        text = self._forward_args.get("text_len", 0) - padding
        grid = self._forward_args.get("grid")
        spans, text_first = [], 0
        if kind == "self" and self.family.text and 0 < text < seq:
            if self.family.text == "first":
                spans, text_first = [(0, text)], text
            else:
                spans = [(seq - text, seq)]
        if grid is not None and grid[0] * grid[1] * grid[2] + (text if spans else 0) != seq:
            grid = None  # this call's sequence is not [text +] the video grid
        return CallInfo(kind=kind, dense_spans=spans, grid=grid, text_first=text_first, row=row, slot=slot)

    # ------------------------------------------------------------------ public
    def stats(self) -> Stats:
        """Per step of the last generation: dense / cache / sparse, counted density, cached bytes."""
        return self.engine.stats()

    def reset(self):
        """Drop cached statistics and step history; the next call starts a new generation."""
        self.engine.reset()

    def set_num_inference_steps(self, n: int):
        """For a bare transformer: the number of denoising steps that schedule fractions refer to."""
        if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n <= 0:
            raise ValueError(f"num_inference_steps must be a positive integer, got {n!r}")
        self.engine.num_steps = int(n)
        self.engine.reset()

    def remove(self):
        """Restore the exact original processors and remove the hook. Safe to call twice, and
        after an exception in the middle of a generation."""
        if self.removed:
            return
        self.removed = True
        self._hook.remove()
        self._post_hook.remove()
        for ns, fn_name, _ in self._routes.values():
            _release(ns, fn_name)
        for name, proc in self.original_processors.items():
            if self.modules[name].processor is not proc:
                self.modules[name].set_processor(proc)
        self.engine.reset()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def __repr__(self):
        state = "removed" if self.removed else f"{len(self.layers)} layers patched"
        return f"RettnHandle({type(self.model).__name__}, family={self.family.name}, {state})"


def attention_modules(model) -> dict:
    """Attention modules (anything with a ``processor`` and ``set_processor``), by module name."""
    return {name: m for name, m in model.named_modules()
            if hasattr(m, "set_processor") and hasattr(m, "processor")}


def _split(target):
    """(transformer, pipeline or None) from a pipeline or a transformer model."""
    transformer = getattr(target, "transformer", None)
    if isinstance(transformer, torch.nn.Module) and attention_modules(transformer):
        return transformer, target
    if isinstance(target, torch.nn.Module) and attention_modules(target):
        return target, None
    raise TypeError(
        "apply_rettention expects a diffusers pipeline with a `transformer` or a diffusers "
        f"transformer model (with attention processors), got {type(target).__name__}"
    )


def apply_rettention(target, config: RettnConfig | None = None, *, preset: str | None = None,
                     **overrides) -> RettnHandle:
    """Make a diffusers pipeline's (or transformer's) attention sparse with Re-ttention.

    Args:
        target: a diffusers pipeline (its ``transformer`` is patched) or a transformer model.
        config: a :class:`RettnConfig`; or ``preset`` names a YAML preset in ``configs/``
            (``rettn.config.preset_names()``); keyword ``overrides`` replace single fields.

    Returns a :class:`RettnHandle`; ``handle.remove()`` restores the model exactly.
    """
    if config is not None and preset is not None:
        raise ValueError("pass either config or preset, not both")
    if config is not None and not isinstance(config, RettnConfig):
        raise TypeError(f"config must be a RettnConfig, got {type(config).__name__}")
    if preset is not None:
        config = RettnConfig.from_preset(preset, **overrides)
    elif config is not None:
        config = config.replace(**overrides) if overrides else config
    else:
        config = RettnConfig.from_dict(overrides)
    model, pipeline = _split(target)
    for module in attention_modules(model).values():
        if isinstance(module.processor, RettnProcessor):
            raise RuntimeError(
                f"rettn is already applied to this {type(model).__name__}; call remove() on the "
                "first handle before applying it again"
            )
    _context_parallel(getattr(model, "_parallel_config", None))  # ring attention: a clear error now
    family = fam.detect_family(model)
    return RettnHandle(model, pipeline, config, family)
