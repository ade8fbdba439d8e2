"""Plain references: dense attention with lse, and dense attention under a block mask.

These build the full score matrix (chunked over queries so memory stays bounded) and are what
every fast path is tested against.
"""

from __future__ import annotations

import torch

from rettn.ops.layout import BlockSparseLayout

# Score elements (float32) materialised at once by the chunked paths: 2**25 floats = 128 MiB.
SCORE_BUDGET = 1 << 25


def _query_chunk(batch_heads: int, seq_k: int, budget: int = SCORE_BUDGET) -> int:
    return max(1, budget // max(1, batch_heads * seq_k))


def masked_attention_reference(q, k, v, token_mask=None, scale=None, compute_dtype=torch.float32):
    """Softmax attention of (B, H, S, D) tensors with an optional bool mask (B|1, H|1, Sq, Sk).

    Returns ``(out, lse)``: out in q's dtype, lse float32 (natural log of the softmax
    denominator of the scaled scores). Computed in ``compute_dtype`` (float64 for tests).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    b, h, sq, _ = q.shape
    sk = k.shape[2]
    out = torch.empty(b, h, sq, v.shape[-1], dtype=compute_dtype, device=q.device)
    lse = torch.empty(b, h, sq, dtype=compute_dtype, device=q.device)
    kc, vc = k.to(compute_dtype), v.to(compute_dtype)
    step = _query_chunk(b * h, sk)
    for s in range(0, sq, step):
        e = min(sq, s + step)
        scores = torch.matmul(q[:, :, s:e].to(compute_dtype), kc.transpose(-1, -2)) * scale
        if token_mask is not None:
            scores = scores.masked_fill(~token_mask[:, :, s:e], float("-inf"))
        lse_c = torch.logsumexp(scores, dim=-1)
        out[:, :, s:e] = torch.matmul(torch.exp(scores - lse_c.unsqueeze(-1)), vc)
        lse[:, :, s:e] = lse_c
    return out.to(q.dtype), lse.to(torch.float32)


def layout_token_mask(layout: BlockSparseLayout) -> torch.Tensor:
    """Expand a layout to a token-level bool mask (B, H, seq_q, seq_k)."""
    blocks = layout.to_dense()
    m = blocks.repeat_interleave(layout.block_q, dim=2).repeat_interleave(layout.block_k, dim=3)
    return m[:, :, : layout.seq_q, : layout.seq_k]


def block_sparse_reference(q, k, v, layout: BlockSparseLayout, scale=None, compute_dtype=torch.float32):
    """Dense attention under the layout's token mask: the plain reference for the sparse kernels."""
    return masked_attention_reference(q, k, v, layout_token_mask(layout), scale, compute_dtype)


# ------------------------------------------------------------------ Re-ttention's statistics
# rho is kept in [RHO_FLOOR, 1]: the selected keys' share of the softmax denominator, never 0.
RHO_FLOOR = 1e-6


def cache_statistics(out_dense, lse_dense, out_sparse, lse_sparse, use_rho=True, residual_dtype=None):
    """A cache step's ``(rho, residual)`` from the dense and sparse passes (the torch math every
    backend but Triton's fused epilogue uses): ``rho = clamp(exp(lse_s - lse_d), RHO_FLOOR, 1)``,
    ``residual = O_d - rho * O_s`` (``O_d - O_s`` without rho) in ``residual_dtype`` (None: no
    residual). Returns ``rho`` only when ``use_rho``."""
    rho_full = torch.exp(lse_sparse - lse_dense).clamp_(RHO_FLOOR, 1.0)
    residual = None
    if residual_dtype is not None:
        if use_rho:
            r = out_dense.float() - rho_full.unsqueeze(-1) * out_sparse.float()
        else:
            r = out_dense.float() - out_sparse.float()
        residual = r.to(residual_dtype)
    return (rho_full if use_rho else None), residual


def step_rho(rho, ramp: float, clamp: bool):
    """A sparse step's ``(rho to use, cached rho after the step)``: the n-th sparse step after a
    cache step uses ``rho_c + (n - 1) * ramp``, clamped to [RHO_FLOOR, 1] when ``clamp``; the
    cached value advances by ``ramp`` unclamped (None when ``ramp`` is 0)."""
    rho_next = rho + ramp if ramp else None
    return (rho.clamp(RHO_FLOOR, 1.0) if clamp else rho), rho_next


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``||out - ref|| / ||ref||`` (L2 over every element, float32) as a 0-d tensor on their
    device (no host read): the staleness measure of the adaptive schedule and of ``rettn
    calibrate``'s probe."""
    ref = ref.float()
    return (out.float() - ref).norm() / ref.norm().clamp_min(1e-12)
