"""Plain references: dense attention with lse, and dense attention under a block mask.

These build the full score matrix (chunked over queries so memory stays bounded) and are what
every fast path is tested against.
"""

from __future__ import annotations

import torch

from ..layout import BlockSparseLayout

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
