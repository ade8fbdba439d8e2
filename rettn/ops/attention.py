"""Public attention operations with their input checks: dense attention with lse, block-sparse
attention and Re-ttention's fused cache and sparse steps (run through :mod:`._dispatch`).

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

import torch

from rettn.errors import InputError, InputTypeError
from rettn.ops import _dispatch as ops
from rettn.ops._cache_pass import cache_pass_outputs
from rettn.ops._checks import check_layout, check_qkv, check_stat, resolve_scale
from rettn.ops._choice import backend_choices  # noqa: F401 - public
from rettn.ops._dispatch import BACKENDS, auto_backend, resolve_backend  # noqa: F401 - public / reports, tests
from rettn.ops._tiles import triton_installed  # noqa: F401 - public (the CLI asks it)


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
    check_qkv(q, k, v)
    check_layout(layout, q, k)
    scale = resolve_scale(scale, q)
    out, lse = ops.call(q, k, v, layout, scale, resolve_backend(backend, q, layout), return_lse)
    return (out, lse) if return_lse else out


def sparse_attention_rescaled(q, k, v, layout, rho, residual, scale=None, backend=None):
    """Re-ttention's sparse step: ``rho * block_sparse_attention(q, k, v, layout) + residual``.

    ``rho`` (B, H, Sq) float32 and ``residual`` (B, H, Sq, D) (any float dtype, moved to q's
    device if needed). On the Triton backend the rescale and the residual add are fused into the
    kernel's epilogue; other backends apply them after the kernel. Returns q's dtype.
    """
    check_qkv(q, k, v)
    check_layout(layout, q, k)
    scale = resolve_scale(scale, q)
    if residual.device != q.device:
        residual = residual.to(q.device, non_blocking=True)
    if rho.device != q.device:
        rho = rho.to(q.device, non_blocking=True)
    out, _ = ops.call(q, k, v, layout, scale, resolve_backend(backend, q, layout), False, rho, residual)
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
    check_qkv(q, k, v)
    scale = resolve_scale(scale, q)
    if backend is None or backend == "auto":
        return ops.call(q, k, v, None, scale, ops.auto_dense(q), True)
    return ops.call(q, k, v, None, scale, resolve_backend(backend, q, None), True)


# ------------------------------------------------------------------ Re-ttention's fused steps
_RESIDUAL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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
    check_qkv(q, k, v)
    check_layout(layout, q, k)
    scale = resolve_scale(scale, q)
    if rho is not None:
        check_stat("rho", rho, q, 3)
        rho = rho.to(q.device, non_blocking=True)
    if residual is not None:
        check_stat("residual", residual, q, 4)
        residual = residual.to(q.device, non_blocking=True)
    ramp = float(ramp)
    if not ramp >= 0 or ramp == float("inf"):
        raise InputError(f"ramp must be a finite number >= 0, got {ramp}")
    backend = resolve_backend(backend, q, layout)
    args = (q, k, v, layout, scale, backend, rho, residual, ramp, bool(clamp_rho), bool(check_finite))
    if not torch.compiler.is_compiling() or ops.needs_autograd(q, k, v, rho, residual):
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
    when ``out_dense`` is all finite; no sync) or None unless ``check_finite``.

    Routes: on the Triton backend one launch sweeps every key block once and writes the dense
    output, rho and R (:mod:`rettn.ops._triton_cache`: the cache step at the cost of a dense
    pass); ``backend=None`` on CUDA times that against the fastest dense kernel with lse plus the
    statistics launch and keeps the faster (op ``"cache"`` in :func:`rettn.backend_choices`); on
    CPU, and on the ``"torch"``/``"flex"`` backends, the dense pass then the statistics. Under
    ``torch.compile`` the whole step is the custom op ``rettn::cache_pass``.
    """
    check_qkv(q, k, v)
    check_layout(layout, q, k)
    scale = resolve_scale(scale, q)
    if residual_dtype is not None and residual_dtype not in _RESIDUAL_DTYPES:
        raise InputTypeError(f"residual_dtype must be one of {_RESIDUAL_DTYPES} or None, got {residual_dtype!r}")
    backend = resolve_backend(backend, q, layout)
    rdt = (residual_dtype or q.dtype) if use_residual else None
    if not use_rho and rdt is None:  # nothing to cache: only the finite check
        out_dense, _ = attention_with_lse(q, k, v, scale=scale)
        return out_dense, None, None, (torch.isfinite(out_dense).all() if check_finite else None)
    if ops.needs_autograd(q, k, v):  # the kernels have no backward: the dense pass's autograd route
        out_dense, lse_dense = attention_with_lse(q, k, v, scale=scale)
        rho, residual, ok = ops.cache_step_outputs(q, k, v, layout, scale, backend,
                                                   out_dense, lse_dense, bool(use_rho), rdt, bool(check_finite))
    elif not torch.compiler.is_compiling():
        out_dense, rho, residual, ok = cache_pass_outputs(q, k, v, layout, scale, backend, bool(use_rho), rdt,
                                                          bool(check_finite))  # eager: no custom-op dispatch
    else:
        out_dense, rho, residual, ok = torch.ops.rettn.cache_pass(
            q, k, v, layout.kv_num_blocks, layout.kv_indices, layout.block_q, layout.block_k, scale, backend,
            bool(use_rho), rdt, bool(check_finite))
    return (out_dense, rho if use_rho else None, residual if rdt is not None else None,
            ok if check_finite else None)


# ------------------------------------------------------------------ dense attention, fastest kernel
def dense_attention(q, k, v, scale=None):
    """Dense attention on the kernel :func:`attention_with_lse` (``backend=None``) chooses: on
    CUDA the fastest of PyTorch's flash, cuDNN and (float32) memory-efficient kernels, timed at
    the first call of each shape; on CPU PyTorch's CPU flash kernel (what ``F.scaled_dot_product_
    attention`` runs there). Returns ``out`` (q's shape, dtype and strides); the lse these
    kernels also return costs them next to nothing. :func:`dense_backend` names the kernel."""
    out, _ = attention_with_lse(q, k, v, scale=scale)
    return out


def dense_backend(q, k) -> str:
    """The kernel :func:`dense_attention` runs for such q, k (``"sdpa:cudnn"``, ``"sdpa:cpu"``,
    ``"torch"``...), or ``"auto"`` while the first call of this shape has not chosen yet.
    Measures nothing."""
    from rettn.ops._choice import default_chooser

    name = ops.auto_dense(q)
    if name == "auto":
        name = default_chooser().lookup("dense+lse", q, k, None) or "auto"
    return name
