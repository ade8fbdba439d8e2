"""Public attention operations: dense attention with lse, and block-sparse attention.

Backends:
- ``"triton"``: the block-sparse Triton kernel (CUDA; CPU only under ``TRITON_INTERPRET=1``);
  not for float32 on CUDA, where its dot products would be FMA with register spills.
- ``"torch"``: gather-the-selected-blocks path; correct everywhere, fast on CPU at high sparsity.
- ``"flex"``: ``torch.nn.attention.flex_attention`` with the same layout as a ``BlockMask``.
``backend=None`` ("auto"): on CUDA the fastest of the candidates, timed at the first call of each
shape, dtype and density bucket (:mod:`rettn.ops._choice`; the table is
:func:`rettn.backend_choices`); on CPU the torch path unless measurement is enabled there.
"""

from __future__ import annotations

import functools
import warnings

import torch

from rettn.errors import InputError, InputTypeError, UnsupportedError
from rettn.ops import _choice as choice
from rettn.ops import _dispatch as ops
from rettn.ops._choice import backend_choices, triton_installed  # noqa: F401 - public / patched in tests
from rettn.ops.layout import BlockSparseLayout

BACKENDS = ("triton", "torch", "flex")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOAT_SET = frozenset(_FLOAT_DTYPES)


def _check_qkv(q, k, v) -> None:
    if type(q) is type(k) is type(v) is torch.Tensor:  # the usual case, checked in one pass
        qs, ks, vs = q.shape, k.shape, v.shape
        if (len(qs) == len(ks) == len(vs) == 4 and q.dtype is k.dtype is v.dtype and q.dtype in _FLOAT_SET
                and qs[0] == ks[0] == vs[0] and qs[1] == ks[1] == vs[1] and ks[2] == vs[2]
                and qs[3] == ks[3] == vs[3] and qs[2] and ks[2] and q.device == k.device == v.device):
            return
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise InputTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise InputError(
                f"{name} must be 4-D (batch, heads, seq, head_dim), got shape {tuple(t.shape)}"
            )
        if t.dtype not in _FLOAT_DTYPES:
            raise InputTypeError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise InputTypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise InputError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or k.shape[:3] != v.shape[:3]:
        raise InputError(
            "q, k, v must agree on batch and heads, and k, v on sequence length: got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not (q.shape[3] == k.shape[3] == v.shape[3]):
        raise InputError(
            f"q, k, v must share the head dim, got {q.shape[3]}, {k.shape[3]}, {v.shape[3]}"
        )
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise InputError("sequence lengths must be positive")


def _scale(scale, q) -> float:
    if scale is None:
        return q.shape[-1] ** -0.5
    if type(scale) is not float:  # a plain float (the usual case) needs no conversion
        # numbers, numpy scalars and one-element tensors convert; text and bools are not scales
        if isinstance(scale, (str, bytes, bool)):
            raise InputError(f"scale must be a positive number, got {scale!r}")
        try:
            scale = float(scale)
        except (TypeError, ValueError, RuntimeError):
            raise InputError(f"scale must be a positive number, got {scale!r}") from None
    if not scale > 0:
        raise InputError(f"scale must be positive, got {scale}")
    return scale


def _triton():
    if not triton_installed():
        raise UnsupportedError("backend='triton' needs the triton package (pip install triton)")
    return choice.triton_module()


def _flex_attention():
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as e:  # pragma: no cover - torch >= 2.5 has it
        raise UnsupportedError("backend='flex' needs torch >= 2.5 (torch.nn.attention.flex_attention)") from e
    return flex_attention


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    return torch.compile(_flex_attention(), dynamic=False)


def _auto(q) -> str:
    """What ``backend=None`` passes on: ``"auto"`` (chosen at run time, inside the op) where the
    chooser measures or on CUDA; the torch path on CPU otherwise (no per-call lookup)."""
    if q.device.type == "cuda" or choice.measures_cpu():
        return "auto"
    return "torch"


def _auto_backend(q, layout) -> str:
    """The backend an auto sparse call of this shape runs: the stored choice once one was made
    (``"triton:128x64"``, ``"flex"``, ...), else ``"auto"`` (CUDA: chosen at the first call) or
    ``"torch"``. Measures nothing (reports use it)."""
    name = _auto(q)
    if name == "auto":
        name = choice.default_chooser().lookup("sparse", q, q, layout) or "auto"
    return name


_FP32_TRITON = ("backend='triton' does not run float32 on CUDA: the kernel's float32 dot products are FMA "
                "with register spills. Pass float16/bfloat16 tensors, or use backend=None (auto: the "
                "torch path or FlexAttention, timed), 'torch' or 'flex'")
_triton_reasons: dict = {}


def _triton_reason(q, layout) -> str | None:
    """Why ``backend="triton"`` cannot run these inputs (cached by the facts it depends on)."""
    blocks = (0, 0) if layout is None else (layout.block_q, layout.block_k)
    dev = q.device.type
    key = (dev, q.dtype, q.shape[-1], blocks, dev != "cuda" and choice._interpreting())
    reason = _triton_reasons.get(key, False)
    if reason is False:
        reason = _triton().unsupported_reason(q, layout)
        if reason is None and q.device.type == "cuda" and q.dtype == torch.float32:
            reason = _FP32_TRITON
        if not torch.compiler.is_compiling():  # no side effects in traced code
            _triton_reasons[key] = reason
    return reason


def _resolve_backend(backend, q, layout) -> str:
    if backend is None or backend == "auto":
        return _auto(q)
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; expected one of {BACKENDS} or None (auto)")
    if backend == "triton":
        if not triton_installed():
            _triton()  # the error
        reason = _triton_reason(q, layout)
        if reason:
            raise InputError(reason)
    if backend == "flex":
        _flex_attention()
    return backend


def _check_layout(layout, q, k) -> None:
    if not isinstance(layout, BlockSparseLayout):
        raise InputTypeError(f"layout must be a rettn.BlockSparseLayout, got {type(layout).__name__}")
    if layout.seq_q != q.shape[2] or layout.seq_k != k.shape[2]:
        raise InputError(
            f"layout is for seq_q={layout.seq_q}, seq_k={layout.seq_k} but q has {q.shape[2]} "
            f"and k has {k.shape[2]} tokens"
        )
    lb, lh, _ = layout.kv_num_blocks.shape
    if lb not in (1, q.shape[0]) or lh not in (1, q.shape[1]):
        raise InputError(
            f"layout has batch={lb}, heads={lh}; q has batch={q.shape[0]}, heads={q.shape[1]} "
            "(each must match or be 1)"
        )
    if layout.device != q.device:
        raise InputError(
            f"layout is on {layout.device} but q is on {q.device}; move it with layout.to(device)"
        )


def _flex_call(fn, q, k, v, block_mask, scale, return_lse):
    """Call flex_attention, asking for the lse the way this torch version prefers."""
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # torch < 2.9
        AuxRequest = None
    with warnings.catch_warnings():  # eager flex on CPU warns that it is unfused: known, chosen
        warnings.simplefilter("ignore", UserWarning)
        if not return_lse:
            return fn(q, k, v, block_mask=block_mask, scale=scale), None
        if AuxRequest is None:
            out, lse = fn(q, k, v, block_mask=block_mask, scale=scale, return_lse=True)
        else:
            out, aux = fn(q, k, v, block_mask=block_mask, scale=scale, return_aux=AuxRequest(lse=True))
            lse = aux.lse
    return out, lse.float()


def _flex_run(q, k, v, layout, scale, return_lse):
    compiled = q.device.type == "cuda" or not return_lse  # compiled flex on CPU has no lse
    fn = _compiled_flex() if compiled else _flex_attention()
    block_mask = None if layout is None else layout.to_block_mask()  # built once per layout
    return _flex_call(fn, q, k, v, block_mask, scale, return_lse)


def block_sparse_attention(q, k, v, layout, scale=None, return_lse=False, backend=None):
    """Attention of q over the key blocks ``layout`` selects.

    Args:
        q, k, v: (B, H, S, D) tensors (strided views such as a transposed (B, S, H, D) work).
        layout: a :class:`BlockSparseLayout` for (seq_q, seq_k); its batch/heads may be 1.
        scale: score scale, default ``D ** -0.5``.
        return_lse: also return the log-sum-exp (B, H, Sq) float32: the natural log of the
            softmax denominator of the scaled scores over the selected keys.
        backend: ``None`` (auto), ``"triton"``, ``"torch"`` or ``"flex"``.

    Returns ``out`` (q's shape and dtype) or ``(out, lse)``.
    """
    _check_qkv(q, k, v)
    _check_layout(layout, q, k)
    scale = _scale(scale, q)
    out, lse = _call(q, k, v, layout, scale, _resolve_backend(backend, q, layout), return_lse)
    return (out, lse) if return_lse else out


def _needs_autograd(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _plain_eager(q) -> bool:
    """Eager code on plain tensors, no dispatch mode: the custom op's dispatch (~30 us of host
    time per call) would add nothing there."""
    return (not torch.compiler.is_compiling() and type(q) is torch.Tensor
            and not torch._C._len_torch_dispatch_stack())


def _call(q, k, v, layout, scale, backend, return_lse, rho=None, residual=None):
    """Run the kernels through the ``rettn::sparse_attention`` custom op (one opaque node under
    torch.compile, and what fake tensors and dispatch modes see); the op's body directly in plain
    eager code and when autograd needs the torch path's graph."""
    if _plain_eager(q) or _needs_autograd(q, k, v, rho, residual):
        out, lse = ops.run(q, k, v, layout, scale, backend, return_lse, rho, residual)
        return out, (lse if return_lse else None)
    n, idx, bq, bk = (None, None, 0, 0) if layout is None else (
        layout.kv_num_blocks, layout.kv_indices, layout.block_q, layout.block_k)
    out, lse = torch.ops.rettn.sparse_attention(q, k, v, n, idx, bq, bk, scale, backend, return_lse, rho, residual)
    return out, (lse if return_lse else None)


def sparse_attention_rescaled(q, k, v, layout, rho, residual, scale=None, backend=None):
    """Re-ttention's sparse step: ``rho * block_sparse_attention(q, k, v, layout) + residual``.

    ``rho`` (B, H, Sq) float32 and ``residual`` (B, H, Sq, D) (any float dtype, moved to q's
    device if needed). On the Triton backend the rescale and the residual add are fused into the
    kernel's epilogue; other backends apply them after the kernel. Returns q's dtype.
    """
    _check_qkv(q, k, v)
    _check_layout(layout, q, k)
    scale = _scale(scale, q)
    if residual.device != q.device:
        residual = residual.to(q.device, non_blocking=True)
    if rho.device != q.device:
        rho = rho.to(q.device, non_blocking=True)
    out, _ = _call(q, k, v, layout, scale, _resolve_backend(backend, q, layout), False, rho, residual)
    return out


def attention_with_lse(q, k, v, scale=None, backend=None):
    """Dense attention that also returns the log-sum-exp.

    q, k, v: (B, H, S, D), possibly strided. Returns ``(out, lse)``: out like q, lse (B, H, Sq)
    float32, the natural log of the softmax denominator of the scaled scores.

    ``backend=None``: PyTorch's own fused kernels, which return the lse and keep memory bounded.
    On CPU its CPU flash kernel; on CUDA the fastest of flash, cuDNN and (float32) the
    memory-efficient kernel, timed at the first call of each shape (the Triton kernel over all
    blocks and the chunked reference are the fallbacks). ``"torch"`` forces the chunked plain
    reference, ``"triton"`` the Triton kernel and ``"flex"`` FlexAttention without a mask.
    """
    _check_qkv(q, k, v)
    scale = _scale(scale, q)
    if backend is None or backend == "auto":
        backend = _auto(q)
        if backend == "torch" and q.device.type == "cpu" and choice.dense.CPU_AVAILABLE:
            backend = "sdpa:cpu"
        return _call(q, k, v, None, scale, backend, True)
    return _call(q, k, v, None, scale, _resolve_backend(backend, q, None), True)


# ------------------------------------------------------------------ Re-ttention's fused steps
_RESIDUAL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_stat(name, t, q, dims):
    """``t`` must broadcast to q's leading ``dims`` dims (B|1, H|1, Sq[, D])."""
    if not isinstance(t, torch.Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    want = tuple(q.shape[:dims])
    if t.dim() != dims or t.shape[2:] != want[2:] or any(n not in (1, w) for n, w in zip(t.shape[:2], want[:2])):
        raise InputError(f"{name} must have shape {want} (batch and heads may be 1), got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise InputTypeError(f"{name} must be a floating tensor, got {t.dtype}")


def sparse_step_attention(q, k, v, layout, rho=None, residual=None, scale=None, ramp=0.0, clamp_rho=True,
                          check_finite=False, backend=None):
    """Re-ttention's sparse step: ``out = clamp(rho) * block_sparse_attention(q, k, v, layout) + residual``.

    Args:
        rho: (B, H, Sq) the cached rho (float32; None: 1), moved to q's device if needed.
        residual: (B, H, Sq, D) the cached R (any float dtype; None: 0).
        ramp: returned ``rho_next = rho + ramp`` (the cached rho for the next sparse step).
        clamp_rho: clamp the rho used to [RHO_FLOOR, 1] (the cached value is not clamped).
        check_finite: also return a 0-d bool tensor, True when ``out`` is all finite (no sync).

    Returns ``(out, rho_next, finite)``: ``rho_next`` None when ``ramp`` is 0 or rho is None,
    ``finite`` None unless ``check_finite``. On the Triton backend this is one kernel launch (the
    rescale, residual, ramp, clamp and finite check in its epilogue); other backends run the same
    math after the kernel. Under ``torch.compile`` it is the custom op ``rettn::sparse_step``.
    """
    _check_qkv(q, k, v)
    _check_layout(layout, q, k)
    scale = _scale(scale, q)
    if rho is not None:
        _check_stat("rho", rho, q, 3)
        rho = rho.to(q.device, non_blocking=True)
    if residual is not None:
        _check_stat("residual", residual, q, 4)
        residual = residual.to(q.device, non_blocking=True)
    ramp = float(ramp)
    if not ramp >= 0 or ramp == float("inf"):
        raise InputError(f"ramp must be a finite number >= 0, got {ramp}")
    backend = _resolve_backend(backend, q, layout)
    args = (q, k, v, layout, scale, backend, rho, residual, ramp, bool(clamp_rho), bool(check_finite))
    if not torch.compiler.is_compiling() or _needs_autograd(q, k, v, rho, residual):
        return ops.sparse_step_outputs(*args)  # eager: no custom-op dispatch (host time per call)
    out, rho_next, ok = torch.ops.rettn.sparse_step(
        q, k, v, layout.kv_num_blocks, layout.kv_indices, layout.block_q, layout.block_k, *args[4:])
    return out, (rho_next if rho is not None and ramp else None), (ok if check_finite else None)


def cache_step_attention(q, k, v, layout, scale=None, use_rho=True, use_residual=True, residual_dtype=None,
                         check_finite=False, backend=None):
    """Re-ttention's cache step: dense attention and the statistics of ``layout``'s blocks.

    ``out_dense, lse_dense = attention_with_lse(q, k, v)``; ``rho = clamp(exp(lse_sparse -
    lse_dense), RHO_FLOOR, 1)``; ``residual = out_dense - rho * out_sparse`` (``out_dense -
    out_sparse`` when ``use_rho`` is False) in ``residual_dtype`` (default q's dtype).

    Returns ``(out_dense, rho, residual, finite)``: ``rho`` (B, H, Sq) float32 or None without
    ``use_rho``, ``residual`` or None without ``use_residual``, ``finite`` a 0-d bool tensor (True
    when ``out_dense`` is all finite; no sync) or None unless ``check_finite``. On the Triton
    backend the statistics are one sparse launch after the dense pass (rho and R in its epilogue;
    the sparse output is never stored); other backends compute them with torch after the kernels.
    Under ``torch.compile`` the statistics are the custom op ``rettn::cache_step``.
    """
    _check_qkv(q, k, v)
    _check_layout(layout, q, k)
    scale = _scale(scale, q)
    if residual_dtype is not None and residual_dtype not in _RESIDUAL_DTYPES:
        raise InputTypeError(f"residual_dtype must be one of {_RESIDUAL_DTYPES} or None, got {residual_dtype!r}")
    backend = _resolve_backend(backend, q, layout)
    out_dense, lse_dense = attention_with_lse(q, k, v, scale=scale)
    rdt = (residual_dtype or q.dtype) if use_residual else None
    if not use_rho and rdt is None:  # nothing to cache: only the finite check
        return out_dense, None, None, (torch.isfinite(out_dense).all() if check_finite else None)
    args = (q, k, v, layout, scale, backend, out_dense, lse_dense, bool(use_rho), rdt, bool(check_finite))
    if not torch.compiler.is_compiling() or _needs_autograd(q, k, v):
        rho, residual, ok = ops.cache_step_outputs(*args)  # eager: no custom-op dispatch
    else:
        rho, residual, ok = torch.ops.rettn.cache_step(
            q, k, v, layout.kv_num_blocks, layout.kv_indices, layout.block_q, layout.block_k, *args[4:])
    return (out_dense, rho if use_rho else None, residual if rdt is not None else None,
            ok if check_finite else None)
