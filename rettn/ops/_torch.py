"""Block-sparse attention in plain torch: gather the selected key/value blocks, then batched matmuls.

Correct on every device and dtype, fast on CPU at high sparsity, and chunked over query blocks so
the gathered keys and the scores stay within a fixed memory budget at any sequence length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rettn.ops.layout import BlockSparseLayout
from rettn.ops.reference import SCORE_BUDGET

# On CPU, small chunks (4 MiB of scores) stay in cache and reuse the allocator's memory: measured
# 2-3x faster than one big chunk at S=4096 (fresh large buffers page-fault on every call).
CPU_SCORE_BUDGET = 1 << 20


def _blocked(x: torch.Tensor, block: int, n_blocks: int, dtype) -> torch.Tensor:
    """(B, H, S, D) -> (B*H*n_blocks, block, D) in ``dtype``, zero-padded at the tail."""
    b, h, s, d = x.shape
    x = x.to(dtype)
    pad = n_blocks * block - s
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.reshape(b * h * n_blocks, block, d)


def torch_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockSparseLayout,
    scale: float,
    return_lse: bool = False,
    budget: int | None = None,
):
    """Sparse attention of (B, H, S, D) tensors restricted to ``layout`` (already validated).

    Returns ``(out, lse)``; ``lse`` is None unless ``return_lse``. ``budget`` bounds the score
    elements materialised per chunk (default: 2**20 on CPU, 2**25 elsewhere).
    """
    b, h, sq, d = q.shape
    sk, dv = k.shape[2], v.shape[3]
    lay = layout.expand(b, h)
    bq, bk, nq, nk, m = lay.block_q, lay.block_k, lay.num_q_blocks, lay.num_k_blocks, lay.max_kv
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if budget is None:
        budget = CPU_SCORE_BUDGET if dev.type == "cpu" else SCORE_BUDGET

    qb = _blocked(q, bq, nq, cdt)  # (BH*nQ, bq, D)
    kb = _blocked(k, bk, nk, cdt).reshape(b * h * nk, bk * d)
    vb = _blocked(v, bk, nk, cdt).reshape(b * h * nk, bk * dv)

    rows = b * h * nq
    counts = lay.kv_num_blocks.reshape(rows).to(dev)
    idx = lay.kv_indices.reshape(rows, m).to(device=dev, dtype=torch.long)
    col_ok = torch.arange(m, device=dev) < counts.unsqueeze(1)  # (rows, M)
    idx = torch.where(col_ok, idx, 0)
    # Keys past seq_k inside a selected tail block are masked too.
    tok_ok = (idx.unsqueeze(-1) * bk + torch.arange(bk, device=dev)) < sk  # (rows, M, bk)
    key_ok = (col_ok.unsqueeze(-1) & tok_ok).reshape(rows, m * bk)
    flat = idx + (torch.arange(b * h, device=dev) * nk).repeat_interleave(nq).unsqueeze(1)

    out_b = torch.empty(rows, bq, dv, dtype=cdt, device=dev)
    lse_b = torch.empty(rows, bq, dtype=torch.float32, device=dev) if return_lse else None
    zero = torch.zeros((), dtype=cdt, device=dev)
    neg_inf = torch.full((), float("-inf"), dtype=cdt, device=dev)
    # Rows sorted by block count, each chunk gathering only its own widest row: a few dense rows
    # (text tokens) do not make every row gather every block.
    order = torch.argsort(counts, stable=True)
    sorted_counts = counts[order].tolist()
    per_block = bq * bk
    s = 0
    while s < rows:
        e = min(rows, s + max(1, budget // (per_block * sorted_counts[s])))
        while e - s > 1 and (e - s) * sorted_counts[e - 1] * per_block > budget:
            e = s + (e - s) // 2
        n, w = e - s, sorted_counts[e - 1]
        sel = order[s:e]
        flat_c = flat[sel, :w]
        kg = kb.index_select(0, flat_c.reshape(-1)).view(n, w * bk, d)
        vg = vb.index_select(0, flat_c.reshape(-1)).view(n, w * bk, dv)
        ok = key_ok.view(rows, m, bk)[sel, :w].reshape(n, 1, w * bk)
        scores = torch.baddbmm(torch.where(ok, zero, neg_inf), qb[sel], kg.transpose(1, 2), alpha=scale)
        mx = scores.amax(dim=-1, keepdim=True)
        if grad:
            scores = torch.exp(scores - mx)
            denom = scores.sum(dim=-1, keepdim=True)
            out_b[sel] = torch.bmm(scores / denom, vg)
        else:  # in-place softmax: no second score-sized buffer
            scores.sub_(mx).exp_()
            denom = scores.sum(dim=-1, keepdim=True)
            out_b.index_copy_(0, sel, torch.bmm(scores.div_(denom), vg))
        if return_lse:
            lse_b[sel] = (mx + denom.log()).squeeze(-1)
        s = e

    out = out_b.reshape(b, h, nq * bq, dv)[:, :, :sq]
    result = torch.empty_like(q) if dv == d else q.new_empty(b, h, sq, dv)
    result.copy_(out)
    lse = lse_b.reshape(b, h, nq * bq)[:, :, :sq].contiguous() if return_lse else None
    return result, lse
