"""The whole cache step behind one call and one custom op: the dense pass and the statistics of
the layout's blocks, either fused into one Triton launch over every key block
(:mod:`._triton_cache`) or as two passes (the fastest dense kernel with lse, then the statistics
launch of :func:`rettn.ops._dispatch.run_cache_step`).

``torch.ops.rettn.cache_pass(q, k, v, kv_num_blocks, kv_indices, block_q, block_k, scale, backend,
use_rho, residual_dtype, check) -> (out_dense, rho, residual, finite)`` (empty tensors where not
asked for): what :func:`rettn.ops.attention.cache_step_attention` runs under ``torch.compile``.

Backends (:func:`run_cache_pass`): ``"triton"`` (or ``"fused"``; ``"fused:BMxBN"`` with those
tiles) the one-pass kernel;
``"dense+stats"`` the two passes with the chooser's picks; ``"torch"``/``"flex"`` the auto dense
pass and the statistics on that backend; ``"auto"`` the faster of ``"fused"`` and
``"dense+stats"``, timed at the first call of a shape (:func:`rettn.ops._choice.resolve_cache`).
"""

from __future__ import annotations

import functools

import torch

from rettn.ops import _choice as choice
from rettn.ops._candidates import parse
from rettn.ops._dispatch import auto_dense, run, run_cache_step
from rettn.ops.layout import trusted_layout


@functools.lru_cache(maxsize=None)
def _triton_cache():
    """``rettn.ops._triton_cache``, imported at first use (it imports triton)."""
    from rettn.ops import _triton_cache

    return _triton_cache


def run_cache_pass(q, k, v, layout, scale, backend, use_rho=True, residual_dtype=None, check=False):
    """The eager cache step: ``(out_dense, rho | None, residual | None, finite | None)``."""
    if backend == "auto":
        backend = choice.resolve_cache(q, k, layout, lambda name: _compared(
            run_cache_pass(q, k, v, layout, scale, name, use_rho, residual_dtype, check)))
    if backend in ("triton", "fused") or backend[:6] == "fused:":
        return _triton_cache().triton_fused_cache_step(q, k, v, layout, scale, use_rho=use_rho,
                                                       residual_dtype=residual_dtype, check=check,
                                                       tiles=parse(backend)[1])
    out_d, lse_d = run(q, k, v, None, scale, auto_dense(q), True)
    stats = "auto" if backend == "dense+stats" else backend
    rho, residual, ok = run_cache_step(q, k, v, layout, scale, stats, out_d, lse_d, use_rho, residual_dtype, check)
    return out_d, rho, residual, ok


def _compared(result):
    """What the chooser checks between candidates: (R, or out_dense without R; rho)."""
    out_d, rho, residual, _ = result
    return (out_d if residual is None else residual), rho


def cache_pass_outputs(q, k, v, layout, scale, backend, use_rho=True, residual_dtype=None, check=False):
    """:func:`run_cache_pass` with the op's output contract (out_dense and residual with q's
    strides). Eager callers use it directly (the custom op's dispatch costs host time)."""
    out_d, rho, residual, ok = run_cache_pass(q, k, v, layout, scale, backend, use_rho, residual_dtype, check)
    if out_d.stride() != q.stride():
        out_d = torch.empty_like(q).copy_(out_d)
    if residual is not None and residual.stride() != q.stride():
        residual = torch.empty_like(q, dtype=residual.dtype).copy_(residual)
    return out_d, rho, residual, ok


@torch.library.custom_op("rettn::cache_pass", mutates_args=())
def cache_pass(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    block_q: int,
    block_k: int,
    scale: float,
    backend: str,
    use_rho: bool,
    residual_dtype: torch.dtype | None,
    check: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    layout = trusted_layout(kv_num_blocks, kv_indices, block_q, block_k, q.shape[2], k.shape[2])
    out_d, rho, residual, ok = cache_pass_outputs(q, k, v, layout, scale, backend, use_rho, residual_dtype, check)
    empty = q.new_empty(0)
    return (out_d, empty.float() if rho is None else rho,
            q.new_empty(0, dtype=residual_dtype or q.dtype) if residual is None else residual,
            empty.bool() if ok is None else ok)


@cache_pass.register_fake
def _(q, k, v, kv_num_blocks, kv_indices, block_q, block_k, scale, backend, use_rho, residual_dtype, check):
    b, h, sq, _ = q.shape
    rho = q.new_empty((b, h, sq) if use_rho else (0,), dtype=torch.float32)
    residual = torch.empty_like(q, dtype=residual_dtype) if residual_dtype is not None else q.new_empty(0)
    ok = q.new_empty(() if check else (0,), dtype=torch.bool)
    return torch.empty_like(q), rho, residual, ok
