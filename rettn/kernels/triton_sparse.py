"""Triton forward kernel: flash-style online softmax over the selected key blocks only.

Returns the output and the log-sum-exp (natural log of the softmax denominator of the scaled
scores). The same kernel runs dense attention (every key block) when ``dense=True``.
Tested against ``reference.block_sparse_reference`` and ``torch_sparse`` (under
``TRITON_INTERPRET=1`` on CPU).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..layout import BlockSparseLayout

_LOG2E = 1.4426950408889634

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


@triton.jit
def _block_sparse_fwd(
    Q, K, V, O, LSE, KV_NUM, KV_IDX, RHO, RES,
    s_qb, s_qh, s_qs, s_qd,
    s_kb, s_kh, s_ks, s_kd,
    s_vb, s_vh, s_vs, s_vd,
    s_ob, s_oh, s_os, s_od,
    s_nb, s_nh, s_nq,
    s_ib, s_ih, s_iq, s_ik,
    s_rb, s_rh, s_rs, s_rd,
    H, SEQ_Q, SEQ_K, HEAD_D, qk_scale,
    LAYOUT_BQ: tl.constexpr, LAYOUT_BK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DENSE: tl.constexpr, STORE_LSE: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    EPILOGUE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    m_ok = offs_m < SEQ_Q

    q = tl.load(
        Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qs + offs_d[None, :] * s_qd,
        mask=m_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh

    SUB: tl.constexpr = LAYOUT_BK // BLOCK_N
    row = (pid_m * BLOCK_M) // LAYOUT_BQ
    if DENSE:
        n_blocks = tl.cdiv(SEQ_K, LAYOUT_BK)
    else:
        n_blocks = tl.load(KV_NUM + b * s_nb + h * s_nh + row * s_nq)
    idx_base = KV_IDX + b * s_ib + h * s_ih + row * s_iq

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # One flat loop over (selected block, sub-tile): the first tile of a selected block always
    # holds a real key, so m_i is finite after the first iteration; later tiles past SEQ_K are
    # fully masked and add exactly zero.
    for t in range(0, n_blocks * SUB):
        if DENSE:
            kb = t // SUB
        else:
            kb = tl.load(idx_base + (t // SUB) * s_ik)
        cols = kb * LAYOUT_BK + (t % SUB) * BLOCK_N + offs_n
        n_ok = cols < SEQ_K
        k = tl.load(
            k_base + cols[:, None] * s_ks + offs_d[None, :] * s_kd,
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        v = tl.load(
            v_base + cols[:, None] * s_vs + offs_d[None, :] * s_vd,
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        qk = tl.where(n_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    acc = acc / l_i[:, None]
    if EPILOGUE:  # Re-ttention sparse step: out = rho * O_sparse + R, fused
        rho = tl.load(RHO + pid_bh * SEQ_Q + offs_m, mask=m_ok, other=1.0)
        res = tl.load(
            RES + b * s_rb + h * s_rh + offs_m[:, None] * s_rs + offs_d[None, :] * s_rd,
            mask=m_ok[:, None] & d_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        acc = acc * rho[:, None] + res
    tl.store(
        O + b * s_ob + h * s_oh + offs_m[:, None] * s_os + offs_d[None, :] * s_od,
        acc.to(O.dtype.element_ty),
        mask=m_ok[:, None] & d_ok[None, :],
    )
    if STORE_LSE:
        lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # ln(2)
        tl.store(LSE + pid_bh * SEQ_Q + offs_m, lse, mask=m_ok)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _is_pow2(x: int) -> bool:
    return x >= 1 and (x & (x - 1)) == 0


def unsupported_reason(q: torch.Tensor, layout: BlockSparseLayout | None) -> str | None:
    """Why the Triton kernel cannot run these inputs, or None if it can."""
    if q.device.type != "cuda" and not (interpreting() and q.device.type == "cpu"):
        return "the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 with CPU tensors)"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"the triton backend supports float16, bfloat16 and float32, not {q.dtype}"
    if q.shape[-1] > MAX_HEAD_DIM or q.shape[-1] < 16:
        return f"the triton backend supports head dims 16 to {MAX_HEAD_DIM}, got {q.shape[-1]}"
    if layout is not None:
        for name, blk in (("block_q", layout.block_q), ("block_k", layout.block_k)):
            if not _is_pow2(blk) or blk < 16:
                return f"the triton backend needs power-of-two block sizes >= 16, got {name}={blk}"
    return None


def _tiles(block_q: int, block_k: int, head_dim: int, device: torch.device):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). Tiles divide the layout's blocks."""
    if device.type != "cuda":  # interpreter: large tiles are fastest on CPU
        return min(block_q, 128), min(block_k, 128), 4, 1
    if head_dim <= 128:
        bm, bn, warps, stages = 128, 64, 8, 3
    else:
        bm, bn, warps, stages = 64, 32, 4, 2
    return min(block_q, bm), min(block_k, bn), warps, stages


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockSparseLayout | None,
    scale: float,
    return_lse: bool = False,
    tiles: tuple[int, int] | None = None,
    rho: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
):
    """Sparse (``layout`` given) or dense (``layout=None``) attention of (B, H, S, D) tensors.

    Inputs may be strided (e.g. a (B, S, H, D) tensor viewed as (B, H, S, D)). Returns
    ``(out, lse)``; out has q's dtype and memory layout, lse is (B, H, Sq) float32 or None.
    With ``rho`` (B, H, Sq) float32 and ``residual`` (B, H, Sq, D) the epilogue returns
    ``rho * out + residual`` (the lse stays that of the plain sparse attention).
    """
    reason = unsupported_reason(q, layout)
    if reason:
        raise ValueError(reason)
    b, h, sq, d = q.shape
    sk = k.shape[2]
    dense = layout is None
    if dense:
        block_q = block_k = 128 if q.device.type == "cuda" else 64
    else:
        layout = layout.expand(b, h)
        block_q, block_k = layout.block_q, layout.block_k
    bm, bn, warps, stages = _tiles(block_q, block_k, d, q.device)
    if tiles is not None:
        bm, bn = tiles
    if dense:
        block_q, block_k = bm, bn
    assert block_q % bm == 0 and block_k % bn == 0, "tiles must divide the layout blocks"

    out = torch.empty_like(q)
    lse = torch.empty(b, h, sq, device=q.device, dtype=torch.float32) if return_lse else out
    if dense:
        kv_num = kv_idx = torch.zeros(1, 1, 1, 1, dtype=torch.int32, device=q.device)
        n_strides, i_strides = (0, 0, 0), (0, 0, 0, 0)
    else:
        kv_num, kv_idx = layout.kv_num_blocks, layout.kv_indices
        n_strides, i_strides = kv_num.stride(), kv_idx.stride()

    epilogue = rho is not None
    if epilogue:
        rho = rho.to(torch.float32).expand(b, h, sq).contiguous()
        residual = residual.expand(b, h, sq, d)
        r_strides = residual.stride()
    else:
        rho = residual = out
        r_strides = (0, 0, 0, 0)

    grid = (triton.cdiv(sq, bm), b * h)
    _block_sparse_fwd[grid](
        q, k, v, out, lse, kv_num, kv_idx, rho, residual,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *n_strides, *i_strides, *r_strides,
        h, sq, sk, d, scale * _LOG2E,
        LAYOUT_BQ=block_q, LAYOUT_BK=block_k,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=max(16, triton.next_power_of_2(d)),
        DENSE=dense, STORE_LSE=return_lse, EPILOGUE=epilogue,
        UPCAST=q.device.type != "cuda",
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=warps, num_stages=stages,
    )
    return out, (lse if return_lse else None)

