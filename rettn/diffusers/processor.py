"""The processor wrapper and its routing: each attention module's processor is wrapped; around
the wrapped call a per-call TorchFunctionMode hands that call's SDPA to the engine, or records why
it stays dense. (How it all fits: rettn/diffusers/apply.py.)"""

from __future__ import annotations

import inspect
import threading
import weakref
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

if TYPE_CHECKING:
    from rettn.diffusers.handle import RettnHandle

from rettn.core import engine as eng
from rettn.ops.layout import tensor_version

SDPA = F.scaled_dot_product_attention  # torch's own function; rettn never rebinds it
_SDPA_PARAMS = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
# diffusers attention backends that end in torch's SDPA (the others are switched to "native"
# for a wrapped call, and rettn's dense calls go back to them)
_SDPA_BACKENDS = ("native", "_native_math", "_native_efficient", "_native_flash", "_native_cudnn")
OTHER = "not image/video attention (the family table does not target it)"


def sdpa_args(args, kwargs):
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
        if func is SDPA:
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
    shape keeps every key. A row with no valid key makes it None.

    Dtype and shape are checked on the host; every check on the values runs on the mask's device
    and comes back in one host read. :data:`mask_checks` keeps the answer per mask tensor."""
    if mask.dtype != torch.bool or mask.shape[-1] != seq_k:
        return None
    if not mask.numel():
        return [seq_k] * batch  # empty: nothing masked out (what mask.all() says)
    padding = mask.dim() == 4 and mask.shape[0] in (1, batch) and mask.shape[1] == 1
    parts = [mask.all().view(1)]
    if padding:
        # the mask's own batch rows (1 or B): a single row is broadcast over the batch
        keys = mask[:, 0, 0]  # the first query row is a real token's
        valid = keys.sum(-1)
        expected = torch.arange(seq_k, device=mask.device) < valid.unsqueeze(-1)
        ok = (keys == expected).all() & (valid > 0).all()
        if mask.shape[2] > 1:  # every real query row must see the same keys; padded rows the same, all or none
            rows, self_rows = mask[:, 0], mask.shape[2] == seq_k  # then query rows past n are padding
            positions = torch.arange(mask.shape[2], device=mask.device)
            for b in range(rows.shape[0]):
                fine = (rows[b] == expected[b]).all(-1)  # (Sq,): the row sees exactly the real keys
                if self_rows:
                    pad = positions >= valid[b]
                    fine = fine | (pad & (rows[b].all(-1) | ~rows[b].any(-1)))
                ok = ok & fine.all()
        parts += [ok.view(1), valid.expand(batch)]
    answer = torch.cat([p.to(torch.int64) for p in parts]).tolist()  # the one host read
    if answer[0]:
        return [seq_k] * batch
    if not padding or not answer[1]:
        return None
    return answer[2:]


class _MaskChecks:
    """:func:`_suffix_valid_lengths`'s answers for the last ``size`` mask tensors: the layers of
    one transformer forward get the same mask tensor, and pay the check (and its host read) once.

    An entry serves only the same tensor object (held by a weakref, so a freed tensor whose id is
    reused never matches), unchanged since (its version counter: an in-place change checks it
    again), for the same batch and key count. Inference tensors keep no version counter: they
    are checked at every call. A fresh mask tensor at each call is simply checked each time."""

    def __init__(self, size: int = 4):
        self.size = size
        self._items: list = []  # (weakref, version, (batch, seq_k), answer), newest last
        self._lock = threading.Lock()

    def valid_lengths(self, mask, batch, seq_k):
        version = tensor_version(mask)
        if version is None:
            return _suffix_valid_lengths(mask, batch, seq_k)
        key = (batch, seq_k)
        with self._lock:
            for ref, ver, k, answer in reversed(self._items):
                if ref() is mask and ver == version and k == key:
                    return None if answer is None else list(answer)
        answer = _suffix_valid_lengths(mask, batch, seq_k)
        item = (weakref.ref(mask), version, key, None if answer is None else tuple(answer))
        with self._lock:
            live = [i for i in self._items if i[0]() is not None]
            self._items = (live + [item])[-self.size:] if self.size > 0 else []
        return answer

    def clear(self):
        with self._lock:
            self._items.clear()

    def __len__(self):
        return len(self._items)


mask_checks = _MaskChecks()


def diffusers_attention(q, k, v, scale, backend: str, **kwargs):
    """The model's own attention through diffusers' backend ``backend`` on (B, H, S, D) tensors:
    a wrapped call's fallback when that backend does not call torch's SDPA, and the engine's
    ``dense_hook`` (rettn's dense steps on the backend the user chose with
    ``set_attention_backend``, not rettn's dense chooser)."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    out = dispatch_attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale,
                                backend=backend, **kwargs)
    return out.transpose(1, 2)


class _Frame:
    """One running wrapped processor call: hands its (first) SDPA call to the engine."""

    def __init__(self, handle: "RettnHandle", slot, role: str, fallback=None, dense_with=None):
        self.handle, self.slot, self.role = handle, slot, role
        self.fallback = fallback  # the user's diffusers backend when it does not call torch's SDPA
        self.dense_with = dense_with  # the backend of rettn's dense calls (None: rettn's chooser)
        self.calls = 0  # SDPA calls seen in this processor call

    def sdpa(self, func, args, kwargs):
        # Each SDPA call of the processor call is decided on its own, its statistics kept apart
        # by its index (Mochi attends once per sample; Qwen-Image 2.1 runs a causal text pass
        # before the image pass; an IP-adapter adds a cross-attention call).
        self.index, self.calls = self.calls, self.calls + 1
        call = sdpa_args(args, kwargs)
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
            q, k, v, mask, p, causal, scale, gqa = sdpa_args(args, kwargs)
            return diffusers_attention(q, k, v, scale, self.fallback, attn_mask=mask, dropout_p=p,
                                       is_causal=causal, enable_gqa=gqa)

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
            side, extra = self.handle.calls.family_of(slot).kv_text, k.shape[2] - q.shape[2]
            if side is None or extra <= 0:
                return engine.note_dense(slot, eng.NOT_SELF)
            key_spans = [(0, extra)] if side == "first" else [(q.shape[2], k.shape[2])]
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        info = self.handle.calls.call_info(slot, role, q.shape[2], call=self.index)
        info.key_spans, info.dense_with = key_spans, self.dense_with
        if attn_mask is None:
            return engine.attend(q, k, v, scale, info)
        if torch.compiler.is_compiling():
            # what the mask allows depends on its values: decided inside rettn::attend, on the
            # real mask (Engine.decide calls masked_or_dense through engine.mask_hook)
            return engine.attend(q, k, v, scale, info, mask=attn_mask)
        return masked_attend(self.handle, q, k, v, attn_mask, scale, info)


def masked_attend(handle: "RettnHandle", q, k, v, attn_mask, scale, info):
    """A call with an attention mask: rettn's output when the mask is key padding at the end of
    each batch row (or keeps every key), else None (the model's own masked attention runs). The
    mask's check costs one host read per mask tensor (:data:`mask_checks`), not one per layer."""
    engine, slot, role = handle.engine, info.slot, info.kind
    valid = mask_checks.valid_lengths(attn_mask, q.shape[0], k.shape[2])  # once per mask tensor
    if valid is None:
        return engine.note_dense(slot, eng.MASK)
    if all(n == k.shape[2] for n in valid):
        return engine.attend(q, k, v, scale, info)
    if role != "self" or q.shape[2] != k.shape[2]:
        return engine.note_dense(slot, eng.MASK)
    # Key padding at the end (HunyuanVideo's padded text, last): each batch row runs on its
    # first n tokens (dense steps too: there on rettn's dense kernel, which a masked SDPA call
    # could not use); its padded query rows (whose outputs never reach a real token) attend
    # the valid keys densely, as the masked original would.
    seq, outs = q.shape[2], []
    for b, n in enumerate(valid):
        qb, kb, vb = q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n]
        row_info = handle.calls.call_info(slot, role, n, row=b, padding=seq - n, call=info.call)
        row_info.dense_with = info.dense_with
        head = engine.attend(qb[:, :, :n], kb, vb, scale, row_info)
        if head is None:  # this row stays dense (e.g. shorter than min_seq_len)
            head = SDPA(qb[:, :, :n], kb, vb, scale=scale)
        tail = SDPA(qb[:, :, n:], kb, vb, scale=scale)
        outs.append(torch.cat([head, tail], dim=2))
    return torch.cat(outs, 0)


def masked_or_dense(handle: "RettnHandle", q, k, v, attn_mask, scale, info):
    """:func:`masked_attend`, or the model's own masked attention where it returns None: what a
    masked call computes inside ``rettn::attend`` (the engine's ``mask_hook``)."""
    out = masked_attend(handle, q, k, v, attn_mask, scale, info)
    if out is not None:
        return out
    if info.dense_with is not None:
        return diffusers_attention(q, k, v, scale, info.dense_with, attn_mask=attn_mask)
    return SDPA(q, k, v, attn_mask=attn_mask, scale=scale)


OWN_ATTRS = frozenset({"original", "handle", "layer", "kind", "name", "slot", "model_index"})


def user_backend(processor) -> str | None:
    """The diffusers attention backend a processor will use, when it is not one that ends in
    torch's SDPA (then rettn switches it to native for the wrapped call); None otherwise."""
    name = backend_name(processor)
    return None if name in _SDPA_BACKENDS else name


def dense_backend_of(processor) -> str | None:
    """The diffusers backend that runs rettn's dense calls of this processor: the user's own
    choice (a non-SDPA backend, or one of torch's SDPA kernels picked by name, e.g.
    ``"_native_math"``); None for the default ``"native"`` or a processor that calls SDPA
    directly, where rettn's dense chooser picks the fastest kernel."""
    name = backend_name(processor)
    return None if name in (None, "native") else name


def backend_name(processor) -> str | None:
    """The diffusers attention backend's name a processor will use (None: it calls SDPA itself)."""
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
    return getattr(backend, "value", backend)


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
        handle.calls.check_parallel(self.original)
        backend = user_backend(self.original)
        frame = _Frame(handle, self.slot, self.kind, fallback=backend, dense_with=dense_backend_of(self.original))
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
        if item in OWN_ATTRS:
            raise AttributeError(item)
        return getattr(self.original, item)

    def __setattr__(self, item, value):
        # writes meant for the processor (diffusers' enable_parallelism sets _parallel_config,
        # set_attention_backend _attention_backend) go to the wrapped one
        if item in OWN_ATTRS:
            object.__setattr__(self, item, value)
        else:
            setattr(self.original, item, value)

    def __repr__(self):
        return (f"RettnProcessor({self.name}, layer={self.layer}, kind={self.kind}, "
                f"wraps {type(self.original).__name__})")


_WRAPPER_CLASSES: dict[type, type] = {}


def wrapper_class(original_cls: type) -> type:
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


# ---------------------------------------------------------------------- which modules, which roles
def attention_modules(model) -> dict:
    """Attention modules (anything with a ``processor`` it calls), by module name."""
    return {name: m for name, m in model.named_modules()
            if callable(getattr(m, "processor", None)) and not isinstance(m, torch.nn.ModuleList)
            and (hasattr(m, "set_processor") or hasattr(m, "get_processor") or "Attention" in type(m).__name__)}


def set_processor(module, processor):
    if hasattr(module, "set_processor"):
        module.set_processor(processor)
    else:  # Mochi's attention has a processor attribute but no set_processor
        module.processor = processor
