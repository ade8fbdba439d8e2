"""One call makes a diffusers pipeline (or its transformer) sparse; one call undoes it.

How it plugs in, without replacing anything process-wide:

- every attention module of each patched transformer (a pipeline's ``transformer`` and, for Wan
  2.2, ``transformer_2``) gets its processor wrapped by a :class:`RettnProcessor` that keeps the
  original's call signature (``Attention.forward`` drops keyword arguments a processor does not
  declare; Wan, Flux and LTX pass them positionally) and delegates to it, so every family keeps
  its own projections, norms, RoPE and concatenation;
- around the wrapped call of a self-attention module, the wrapper enters :class:`_Intercept`, a
  ``torch.overrides.TorchFunctionMode``: it sees that call's ``F.scaled_dot_product_attention``
  (diffusers' ``dispatch_attention_fn`` reaches it too, with the native backends) and hands it to
  the engine. Torch function modes are per thread and last for the one call, so SDPA called
  anywhere else (a VAE, a text encoder, another thread or pipeline) is torch's own function,
  untouched; ``F.scaled_dot_product_attention`` is never rebound. A processor set to a backend
  that does not call torch's SDPA (``set_attention_backend("flash")``, ``"flex"``, ...) is
  switched to diffusers' native backend for the call, and rettn's dense calls go to the user's
  backend;
- every call is recorded with its decision: sparse, or dense with a reason (``handle.stats()``,
  ``handle.describe()``); a model none of whose attention reaches the engine is an error at its
  first call, not a dense run;
- the step and CFG branch come from the pipeline's own signals (its scheduler, diffusers'
  ``cache_context``; :mod:`rettn.diffusers.steps`), the timestep for a bare transformer; a forward hook
  folds each call's statistics and checks its outputs were finite. Both hooks run eagerly in a
  compiled model.

``handle.remove()`` restores the exact original processor objects and removes the hooks.
"""

from __future__ import annotations

import inspect
import numbers
import warnings

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from rettn.core import engine as eng
from rettn.diffusers import families as fam
from rettn.core.config import RettnConfig
from rettn.core.engine import CallInfo, Engine, Stats
from rettn.diffusers.steps import PipelineSteps, attach_context_listener, detach_context_listener

_SDPA = F.scaled_dot_product_attention  # torch's own function; rettn never rebinds it
_SDPA_PARAMS = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
# diffusers attention backends that end in torch's SDPA (the others are switched to "native"
# for a wrapped call, and rettn's dense calls go back to them)
_SDPA_BACKENDS = ("native", "_native_math", "_native_efficient", "_native_flash", "_native_cudnn")
OTHER = "not image/video attention (the family table does not target it)"


def _sdpa_args(args, kwargs):
    """(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa) of an SDPA call, or None
    when it passes anything else."""
    names = ("query", "key", "value", *_SDPA_PARAMS)
    if len(args) > len(names):
        return None
    values = dict(zip(names, args))
    for name, value in kwargs.items():
        if name in values or name not in names:
            return None
        values[name] = value
    if not all(n in values for n in names[:3]):
        return None
    return (values["query"], values["key"], values["value"], values.get("attn_mask"),
            values.get("dropout_p", 0.0), values.get("is_causal", False), values.get("scale"),
            values.get("enable_gqa", False))


class _Intercept(TorchFunctionMode):
    """Entered around one wrapped processor call: sees that call's SDPA, passes the rest on."""

    def __init__(self, frame: "_Frame"):
        super().__init__()
        self.frame = frame

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA:
            return self.frame.sdpa(func, args, kwargs)
        name = getattr(func, "__name__", None)
        if args and name is not None and getattr(torch.Tensor, name, None) is func:
            # a tensor method, called as one: torch.compile traces tensor methods natively, not
            # the Python bodies of some of them (Tensor.unflatten calls super())
            return getattr(args[0], name)(*args[1:], **kwargs)
        return func(*args, **kwargs)


def _suffix_valid_lengths(mask, batch, seq_k):
    """For a key-padding mask (True = keep, padding at the end of the keys), the valid key count
    of each batch row; None for any other mask. The mask may be (B, 1, 1, Sk), or (B, 1, Sq, Sk)
    whose rows of real tokens all share the pattern (HunyuanVideo 1.5); an all-True mask of any
    shape keeps every key."""
    if mask.dtype != torch.bool or mask.shape[-1] != seq_k:
        return None
    if bool(mask.all()):
        return [seq_k] * batch
    if mask.dim() != 4 or mask.shape[0] not in (1, batch) or mask.shape[1] != 1:
        return None
    keys = mask[:, 0, 0].expand(batch, seq_k)  # the first query row is a real token's
    valid = keys.sum(-1)
    expected = torch.arange(seq_k, device=mask.device) < valid.unsqueeze(-1)
    if not torch.equal(keys, expected) or int(valid.min()) == 0:
        return None
    if mask.shape[2] > 1:  # every real query row must see the same keys; padded rows the same, all or none
        rows = mask[:, 0].expand(batch, -1, seq_k)
        for b, n in enumerate(valid.tolist()):
            real = n if rows.shape[1] == seq_k else rows.shape[1]
            if not torch.equal(rows[b, :real], expected[b].expand(real, seq_k)):
                return None
            pad = rows[b, real:]
            if pad.numel() and not bool(((pad == expected[b]).all(-1) | pad.all(-1) | ~pad.any(-1)).all()):
                return None
    return valid.tolist()


class _Frame:
    """One running wrapped processor call: hands its (first) SDPA call to the engine."""

    def __init__(self, handle: "RettnHandle", slot, role: str, fallback=None):
        self.handle, self.slot, self.role = handle, slot, role
        self.fallback = fallback  # the user's diffusers backend when it does not call torch's SDPA
        self.calls = 0  # SDPA calls seen in this processor call

    def sdpa(self, func, args, kwargs):
        # Each SDPA call of the processor call is decided on its own, its statistics kept apart
        # by its index (Mochi attends once per sample; Qwen-Image 2.1 runs a causal text pass
        # before the image pass; an IP-adapter adds a cross-attention call).
        self.index, self.calls = self.calls, self.calls + 1
        call = _sdpa_args(args, kwargs)
        if call is None:
            self.handle.engine.note_dense(self.slot, eng.UNSUPPORTED_ARGS)
            return self._dense(func, args, kwargs)
        out = self.attend(*call)
        return self._dense(func, args, kwargs) if out is None else out

    def _dense(self, func, args, kwargs):
        q = args[0] if args else kwargs["query"]
        with self.handle.engine.region("attention", q.device):  # the model's own attention
            if self.fallback is None:
                return func(*args, **kwargs)
            from diffusers.models.attention_dispatch import dispatch_attention_fn

            call = _sdpa_args(args, kwargs)
            q, k, v, mask, p, causal, scale, gqa = call
            out = dispatch_attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                        dropout_p=p, is_causal=causal, scale=scale, enable_gqa=gqa,
                                        backend=self.fallback)
            return out.transpose(1, 2)

    def attend(self, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        engine, slot = self.handle.engine, self.slot
        if dropout_p or is_causal:
            return engine.note_dense(slot, eng.DROPOUT_CAUSAL)
        if enable_gqa or q.dim() != 4 or k.dim() != 4 or k.shape[1] != q.shape[1]:
            return engine.note_dense(slot, eng.UNSUPPORTED_ARGS)
        role = self.role
        if role == "auto":  # generic path: keys over the query tokens themselves = self-attention
            role = "self" if q.shape[2] == k.shape[2] else "cross"
        if role == "cross" and not self.handle.config.sparse_cross_attention:
            return engine.note_dense(slot, eng.CROSS)
        key_spans = []
        if role == "self" and q.shape[2] != k.shape[2]:
            # queries over [text, image] keys (Qwen-Image 2.1, PRX, NucleusMoE): the family says
            # which side the extra keys sit on; they stay dense
            side, extra = self.handle._family_of(slot).kv_text, k.shape[2] - q.shape[2]
            if side is None or extra <= 0:
                return engine.note_dense(slot, eng.NOT_SELF)
            key_spans = [(0, extra)] if side == "first" else [(q.shape[2], k.shape[2])]
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        info = self.handle._call_info(slot, role, q.shape[2], call=self.index)
        info.key_spans = key_spans
        if attn_mask is None:
            return engine.attend(q, k, v, scale, info)
        valid = _suffix_valid_lengths(attn_mask, q.shape[0], k.shape[2])
        if valid is None:
            return engine.note_dense(slot, eng.MASK)
        if all(n == k.shape[2] for n in valid):
            return engine.attend(q, k, v, scale, info)
        if role != "self" or q.shape[2] != k.shape[2]:
            return engine.note_dense(slot, eng.MASK)
        if engine.step_kind() == "dense":
            return engine.note_dense(slot, eng.DENSE_STEP)
        # Key padding at the end (HunyuanVideo's padded text, last): each batch row runs on its
        # first n tokens; its padded query rows (whose outputs never reach a real token) attend
        # the valid keys densely, as the masked original would.
        seq, outs = q.shape[2], []
        for b, n in enumerate(valid):
            qb, kb, vb = q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n]
            row_info = self.handle._call_info(slot, role, n, row=b, padding=seq - n, call=self.index)
            head = engine.attend(qb[:, :, :n], kb, vb, scale, row_info)
            if head is None:  # this row stays dense (e.g. shorter than min_seq_len)
                head = _SDPA(qb[:, :, :n], kb, vb, scale=scale)
            tail = _SDPA(qb[:, :, n:], kb, vb, scale=scale)
            outs.append(torch.cat([head, tail], dim=2))
        return torch.cat(outs, 0)


_OWN_ATTRS = frozenset({"original", "handle", "layer", "kind", "name", "slot", "model_index"})


def _user_backend(processor) -> str | None:
    """The diffusers attention backend a processor will use, when it is not one that ends in
    torch's SDPA (then rettn switches it to native for the wrapped call); None otherwise."""
    if "_attention_backend" not in getattr(processor, "__dict__", {}) and \
            not hasattr(type(processor), "_attention_backend"):
        return None  # a processor that calls SDPA directly (CogVideoX, PixArt, ...)
    backend = processor._attention_backend
    if backend is None:
        try:
            from diffusers.models.attention_dispatch import _AttentionBackendRegistry

            backend = _AttentionBackendRegistry.get_active_backend()[0]
        except (ImportError, AttributeError):
            return None
    name = getattr(backend, "value", backend)
    return None if name in _SDPA_BACKENDS else name


class RettnProcessor:
    """Wraps one attention module's processor; delegates every call to it unchanged."""

    def __init__(self, original, handle: "RettnHandle", layer: int | None, kind: str, name: str, slot,
                 model_index: int = 0):
        self.original, self.handle, self.layer, self.kind, self.name = original, handle, layer, kind, name
        self.slot, self.model_index = slot, model_index  # the calls reach the layer's state through slot

    def __call__(self, attn, *args, **kwargs):
        handle = self.handle
        if handle.removed:
            return self.original(attn, *args, **kwargs)
        if self.kind == "other" or (self.kind == "cross" and not handle.config.sparse_cross_attention):
            handle.engine.note_dense(self.slot, eng.CROSS if self.kind == "cross" else OTHER)
            return self.original(attn, *args, **kwargs)
        handle._check_parallel(self.original)
        backend = _user_backend(self.original)
        frame = _Frame(handle, self.slot, self.kind, fallback=backend)
        if backend is not None:  # a backend that never calls torch's SDPA: native for this call
            self.original._attention_backend = "native"
        try:
            with _Intercept(frame):
                out = self.original(attn, *args, **kwargs)
        finally:
            if backend is not None:
                self.original._attention_backend = backend
        if not frame.calls:
            handle.engine.note_dense(self.slot, eng.NOT_REACHED)
        else:
            handle.reached = True
        return out

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
        return (f"RettnProcessor({self.name}, layer={self.layer}, kind={self.kind}, "
                f"wraps {type(self.original).__name__})")


_WRAPPER_CLASSES: dict[type, type] = {}


def _wrapper_class(original_cls: type) -> type:
    """A RettnProcessor subclass whose ``__call__`` shows the original's signature, so that
    ``Attention.forward`` passes it exactly the arguments the original would get."""
    cls = _WRAPPER_CLASSES.get(original_cls)
    if cls is None:
        def __call__(self, attn, *args, **kwargs):
            return RettnProcessor.__call__(self, attn, *args, **kwargs)

        try:
            __call__.__signature__ = inspect.signature(original_cls.__call__)
        except (TypeError, ValueError):  # a builtin or C-level __call__: keep the generic one
            pass
        cls = type(f"Rettn{original_cls.__name__}", (RettnProcessor,), {"__call__": __call__})
        _WRAPPER_CLASSES[original_cls] = cls
    return cls


def _context_parallel(parallel_config):
    """diffusers' ContextParallelConfig of a processor when it spans more than one process, else
    None. Ring attention (each rank holds a shard of the keys) cannot give rettn a whole
    attention row to select blocks from and would need the lse merged across shards: an error,
    not a wrong result."""
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


# ---------------------------------------------------------------------- which modules, which roles
def attention_modules(model) -> dict:
    """Attention modules (anything with a ``processor`` it calls), by module name."""
    return {name: m for name, m in model.named_modules()
            if callable(getattr(m, "processor", None)) and not isinstance(m, torch.nn.ModuleList)
            and (hasattr(m, "set_processor") or hasattr(m, "get_processor") or "Attention" in type(m).__name__)}


def _set_processor(module, processor):
    if hasattr(module, "set_processor"):
        module.set_processor(processor)
    else:  # Mochi's attention has a processor attribute but no set_processor
        module.processor = processor


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
            raise ValueError(f"found no self-attention modules to sparsify in {type(self.model).__name__}")
        self.engine = Engine(config, n_sparse, self.family.name, rising_timesteps=self.family.timestep == "rising",
                             timestep_end=self.family.timestep_end)
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
                _set_processor(module, _wrapper_class(type(orig))(orig, self, r["layer"], kind, key, slot, i))
        self._forward_args: dict = {}
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
            raise ValueError(f"rettn needs the transformer's `{family.timestep_arg}` argument to track steps; "
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
        self._forward_args = {
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
            raise RuntimeError(
                f"rettn reached none of the attention calls of {type(self.model).__name__}: its processors "
                f"{procs} compute attention without torch's scaled_dot_product_attention (or diffusers' "
                "native dispatch), so nothing could run sparse. Remove rettn (handle.remove()); see "
                "rettn.describe(model) for what each module does"
            )
        if missed:
            warnings.warn(
                f"rettn: {len(missed)} self-attention module(s) never reached the engine and run dense "
                f"(first: {missed[0]}); handle.describe() lists them", RuntimeWarning, stacklevel=3)

    def _check_parallel(self, processor):
        _context_parallel(getattr(processor, "_parallel_config", None))

    def _family_of(self, slot) -> fam.Family:
        return self.families[slot.model]

    def _call_info(self, slot, kind: str, seq: int, row=None, padding: int = 0, call: int = 0) -> CallInfo:
        """Dense spans (conditioning tokens), grid and video start for an attention call over
        ``seq`` tokens; ``padding`` tokens were cut from the end of this row's sequence."""
        family = self._family_of(slot)
        grid = self._forward_args.get("grid")
        video = grid[0] * grid[1] * grid[2] if grid is not None else None
        if family.conditioning == "non-grid" and video is not None:
            text = seq - video  # registers, padding, several text encoders: all conditioning
        else:
            text = self._forward_args.get("text_len", 0) - padding
        spans, text_first = [], 0
        if kind == "self" and family.text and 0 < text < seq and seq != video:
            if family.text == "first":
                spans, text_first = [(0, text)], text
            else:
                spans = [(seq - text, seq)]
        if video is not None and video + (text if spans else 0) != seq:
            grid = None  # this call's sequence is not [text +] the video grid
        return CallInfo(kind=kind, dense_spans=spans, grid=grid, text_first=text_first, row=row, slot=slot,
                        call=call)

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
        return Description(rows, [f.name for f in self.families], self.preset)

    def reset(self):
        """Drop cached statistics and step history; the next call starts a new generation."""
        self.engine.reset()
        if self._steps is not None:
            self._steps.reset()

    def set_num_inference_steps(self, n: int):
        """For a bare transformer: the number of denoising steps that schedule fractions refer to."""
        if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n <= 0:
            raise ValueError(f"num_inference_steps must be a positive integer, got {n!r}")
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
                _set_processor(self.modules[key], proc)
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

    def __init__(self, rows: list[dict], families: list[str], preset: str | None = None):
        self.rows, self.families, self.preset = rows, families, preset

    def dense_unseen(self) -> list[str]:
        """Modules that rettn targeted but whose calls never reached the engine."""
        return [r["module"] for r in self.rows if eng.NOT_REACHED in r.get("dense", {})]

    def __str__(self):
        lines = [f"rettn: family {', '.join(dict.fromkeys(self.families))}"
                 + (f", preset {self.preset}" if self.preset else "")]
        lines.append("model | module | processor | role | layer | decision | calls | sparse | dense (reason: calls)")
        for r in self.rows:
            dense = "; ".join(f"{k}: {v}" for k, v in r.get("dense", {}).items()) or "-"
            layer = "-" if r["layer"] is None else str(r["layer"])
            lines.append(f"{r['model']} | {r['module']} | {r['processor']} | {r['role']} | {layer} | "
                         f"{r['decision']} | {r.get('calls', '-')} | {r.get('sparse', '-')} | {dense}")
        return "\n".join(lines)

    __repr__ = __str__


# ---------------------------------------------------------------------- entry points
def _transformers(target) -> tuple[list, object]:
    """([(label, transformer), ...], pipeline or None) from a pipeline or a transformer model.
    A pipeline's denoisers are its components named ``transformer`` and ``transformer_<n>``."""
    components = getattr(target, "components", None)
    if isinstance(components, dict) and not isinstance(target, torch.nn.Module):
        found = [(name, m) for name, m in components.items()
                 if (name == "transformer" or name.startswith("transformer_")) and isinstance(m, torch.nn.Module)
                 and attention_modules(m)]
        if found:
            return sorted(found, key=lambda x: (x[0] != "transformer", x[0])), target
    transformer = getattr(target, "transformer", None)
    if isinstance(transformer, torch.nn.Module) and attention_modules(transformer):
        return [("transformer", transformer)], target
    if isinstance(target, torch.nn.Module) and attention_modules(target):
        return [("transformer", target)], None
    raise TypeError(
        "apply_rettention expects a diffusers pipeline with a `transformer` or a diffusers "
        f"transformer model (with attention processors), got {type(target).__name__}"
    )


def _resolve_config(target, models, families, config, preset, overrides):
    if config is not None and preset is not None:
        raise ValueError("pass either config or preset, not both")
    if config is not None and not isinstance(config, RettnConfig):
        raise TypeError(f"config must be a RettnConfig, got {type(config).__name__}")
    if config is not None:
        return (config.replace(**overrides) if overrides else config), None
    if preset is None:
        preset = fam.default_preset(families[0], models[0], target)
    if preset is not None:
        return RettnConfig.from_preset(preset, **overrides), preset
    return RettnConfig.from_dict(overrides), None


def _check_schedule_without_steps(config: RettnConfig, pipeline):
    if pipeline is None and config.num_inference_steps is None and isinstance(config.dense_final, int) \
            and config.dense_final > 0:
        raise ValueError(
            f"dense_final={config.dense_final} counts steps from the end, so it needs the number of steps, "
            "which a bare transformer does not tell: apply rettn to the pipeline, or set "
            "RettnConfig(num_inference_steps=N) / handle.set_num_inference_steps(N), or give dense_final "
            "as a fraction (read against the timestep's progress)"
        )


def apply_rettention(target, config: RettnConfig | None = None, *, preset: str | None = None,
                     **overrides) -> RettnHandle:
    """Make a diffusers pipeline's (or transformer's) attention sparse with Re-ttention.

    Args:
        target: a diffusers pipeline (its ``transformer``, and ``transformer_2`` where it has
            one, are patched, under one schedule) or a transformer model.
        config: a :class:`RettnConfig`; or ``preset`` names a YAML preset in ``configs/``
            (``rettn.core.config.preset_names()``); keyword ``overrides`` replace single fields.
            With neither, the preset of the model's variant (``handle.preset`` says which; a
            model without one gets ``RettnConfig()``'s defaults).

    Returns a :class:`RettnHandle`; ``handle.remove()`` restores the model exactly.
    """
    models, pipeline = _transformers(target)
    families = [fam.detect_family(m) for _, m in models]
    config, preset = _resolve_config(target, [m for _, m in models], families, config, preset, overrides)
    for _, model in models:
        for module in attention_modules(model).values():
            if isinstance(module.processor, RettnProcessor):
                raise RuntimeError(
                    f"rettn is already applied to this {type(model).__name__}; call remove() on the "
                    "first handle before applying it again"
                )
        _context_parallel(getattr(model, "_parallel_config", None))  # ring attention: a clear error now
    _check_schedule_without_steps(config, pipeline)
    for family, (_, model) in zip(families, models):
        if family.generic:
            warnings.warn(fam.generic_warning(model), UserWarning, stacklevel=2)
    return RettnHandle(models, pipeline, config, families, preset)


def describe(target, config: RettnConfig | None = None, *, preset: str | None = None, **overrides) -> Description:
    """What :func:`apply_rettention` would do with ``target``, without patching it: the family,
    the preset, and each attention module's role and static decision. For a patched model,
    ``handle.describe()`` adds what each module's calls did."""
    models, pipeline = _transformers(target)
    families = [fam.detect_family(m) for _, m in models]
    config, preset = _resolve_config(target, [m for _, m in models], families, config, preset, overrides)
    rows = []
    for (label, model), family in zip(models, families):
        rows += [dict(model=label, **{k: v for k, v in r.items()}) for r in plan(model, family, config)]
    return Description(rows, [f.name for f in families], preset)

