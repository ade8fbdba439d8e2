"""Re-ttention's cache step in one Triton pass: the dense output, its lse and the statistics of
the layout's selected key blocks (rho and R) from a single sweep over every key block.

Each program (one query tile) walks its layout row's key blocks in the order "selected blocks
first, then the rest" (:func:`sweep_order`: the row's selected blocks ascending, then the
unselected ones ascending; built once per layout on the device, no sync). One online softmax
runs over the whole sweep with one running max ``m``, one denominator ``l`` and one
accumulator. When the selected blocks are done, the program keeps a copy of ``(m_s, l_s,
acc_s)``: exactly the sparse pass's state (the same blocks in the same order, the same max), so

- ``O_sparse = acc_s / l_s`` and ``lse_sparse = m_s + log l_s`` are what the separate sparse
  launch computes; ``l_s >= 1`` (the selected set's own max term), so it never underflows,
  whatever the unselected scores are;
- the sweep continues over the unselected blocks: ``O_dense = acc / l``, ``lse_dense = m + log l``;
- ``rho = clamp(l_s * 2**(m_s - m) / l, RHO_FLOOR, 1)`` (= ``exp(lse_sparse - lse_dense)``,
  formed without the exponent of a difference of two large logs) and ``R = O_dense - rho *
  O_sparse`` (``O_dense - O_sparse`` without rho), stored in ``residual_dtype``.

A row whose layout selects every key block sweeps nothing after the copy: ``rho = 1``, ``R = 0``.
The finite check covers ``O_dense`` (as the two-pass route's). Only the per-tile accumulation
is on the sweep's path: the copy is two registers per row and one accumulator tile, untouched
in the second loop.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rettn.errors import InputError
from rettn.ops import _triton as base
from rettn.ops._tiles import TileConfig, block_d_for, flag_scratch, row_alignment, tile_config
from rettn.ops.layout import BlockSparseLayout, dense_to_kv, layout_memo
from rettn.ops.reference import RHO_FLOOR

_FLOOR = tl.constexpr(RHO_FLOOR)
_LOG2E = 1.4426950408889634
MODE = "fused"  # the tile table's key (rettn.ops._tiles.tile_config)


@triton.jit
def _sweep(acc, m_i, l_i, q, k_base, v_base, idx_base, s_ik, t_lo, t_hi, offs_n, offs_d, d_ok,
           s_ks, s_kd, s_vs, s_vd, SEQ_K, qk_scale,
           ALIGN: tl.constexpr, LAYOUT_BK: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
           DOT_PREC: tl.constexpr):
    """The online softmax over sweep positions [t_lo, t_hi) (key tiles of the row's ordered blocks)."""
    SUB: tl.constexpr = LAYOUT_BK // BLOCK_N
    for t in range(t_lo, t_hi):
        kb = tl.load(idx_base + (t // SUB) * s_ik)
        cols = kb * LAYOUT_BK + (t % SUB) * BLOCK_N + offs_n
        n_ok = cols < SEQ_K
        nd_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + tl.multiple_of(cols * s_ks, ALIGN)[:, None] + offs_d[None, :] * s_kd,
                    mask=nd_ok, other=0.0)
        v = tl.load(v_base + tl.multiple_of(cols * s_vs, ALIGN)[:, None] + offs_d[None, :] * s_vd,
                    mask=nd_ok, other=0.0)
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
    return acc, m_i, l_i


@triton.jit
def _round_bf16(x):
    """float32 -> the nearest bfloat16 value (the interpreter truncates; GPUs round to even)."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def cache_fwd(
    Q, K, V, OD, R, LSE, RHO, KV_SEL, KV_ORD, FLAG, SCRATCH,
    s_qb, s_qh, s_qs, s_qd,
    s_kb, s_kh, s_ks, s_kd,
    s_vb, s_vh, s_vs, s_vd,
    s_ob, s_oh, s_os, s_od,
    s_rb, s_rh, s_rs, s_rd,
    s_nb, s_nh, s_nq,
    s_ib, s_ih, s_iq, s_ik,
    H, SEQ_Q, SEQ_K, N_TILES, N_KB, qk_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr,
    LAYOUT_BQ: tl.constexpr, LAYOUT_BK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    STORE_LSE: tl.constexpr, HAS_RHO: tl.constexpr, HAS_RES: tl.constexpr, CHECK: tl.constexpr,
    FINITE_LIMIT: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = pid // N_TILES
    tile = pid % N_TILES
    b = bh // H
    h = bh % H
    start_m = tile * BLOCK_M

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < SEQ_Q
    d_ok = offs_d < HEAD_D
    md_ok = m_ok[:, None] & d_ok[None, :]

    q = tl.load(Q + tl.multiple_of(b * s_qb + h * s_qh, ALIGN) + tl.multiple_of(offs_m * s_qs, ALIGN)[:, None]
                + offs_d[None, :] * s_qd, mask=md_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + tl.multiple_of(b * s_kb + h * s_kh, ALIGN)
    v_base = V + tl.multiple_of(b * s_vb + h * s_vh, ALIGN)

    SUB: tl.constexpr = LAYOUT_BK // BLOCK_N
    row = start_m // LAYOUT_BQ
    n_sel = tl.load(KV_SEL + b * s_nb + h * s_nh + row * s_nq)
    idx_base = KV_ORD + b * s_ib + h * s_ih + row * s_iq

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # the selected blocks (at least one, with a real key in its first tile: m_i is finite after it)
    acc, m_i, l_i = _sweep(acc, m_i, l_i, q, k_base, v_base, idx_base, s_ik, 0, n_sel * SUB, offs_n, offs_d,
                           d_ok, s_ks, s_kd, s_vs, s_vd, SEQ_K, qk_scale, ALIGN, LAYOUT_BK, BLOCK_N, UPCAST,
                           DOT_PREC)
    m_s = m_i
    l_s = l_i
    o_s = acc / l_i[:, None]  # the sparse output (kept in registers, never stored)
    # the unselected blocks: the same softmax continues to the dense result
    acc, m_i, l_i = _sweep(acc, m_i, l_i, q, k_base, v_base, idx_base, s_ik, n_sel * SUB, N_KB * SUB, offs_n,
                           offs_d, d_ok, s_ks, s_kd, s_vs, s_vd, SEQ_K, qk_scale, ALIGN, LAYOUT_BK, BLOCK_N,
                           UPCAST, DOT_PREC)
    o_d = acc / l_i[:, None]
    row_ptrs = bh * SEQ_Q + offs_m  # LSE and RHO: contiguous (B, H, Sq)
    if STORE_LSE:
        tl.store(LSE + row_ptrs, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=m_ok)  # ln(2)
    w = l_s * tl.exp2(m_s - m_i) / l_i  # the selected blocks' share of the denominator
    w = tl.minimum(tl.maximum(w, _FLOOR), 1.0)
    if HAS_RHO:
        tl.store(RHO + row_ptrs, w, mask=m_ok)
    if HAS_RES:
        if HAS_RHO:
            r = o_d - w[:, None] * o_s
        else:
            r = o_d - o_s
        if UPCAST:
            if R.dtype.element_ty == tl.bfloat16:
                r = _round_bf16(r)
        tl.store(R + tl.multiple_of(b * s_rb + h * s_rh, ALIGN) + tl.multiple_of(offs_m * s_rs, ALIGN)[:, None]
                 + offs_d[None, :] * s_rd, r.to(R.dtype.element_ty), mask=md_ok)
    checked = o_d
    if UPCAST:
        if OD.dtype.element_ty == tl.bfloat16:
            o_d = _round_bf16(o_d)
    tl.store(OD + tl.multiple_of(b * s_ob + h * s_oh, ALIGN) + tl.multiple_of(offs_m * s_os, ALIGN)[:, None]
             + offs_d[None, :] * s_od, o_d.to(OD.dtype.element_ty), mask=md_ok)
    if CHECK:  # NaN, or a value that is (or rounds to) inf in out_dense's dtype (as rettn.ops._triton)
        row_bad = tl.max(tl.where(d_ok[None, :] & ~(tl.abs(checked) < FINITE_LIMIT), 1, 0), 1)
        bad = tl.max(tl.where(m_ok, row_bad, 0), 0)
        tl.atomic_or(SCRATCH + 1, bad)
        done = tl.atomic_add(SCRATCH, 1)
        if done == tl.num_programs(0) - 1:
            total = tl.atomic_xchg(SCRATCH + 1, 0)
            tl.atomic_xchg(SCRATCH, 0)
            tl.store(FLAG, total == 0)


# ------------------------------------------------------------------------------ launch
def sweep_order(layout: BlockSparseLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n_sel (B|1, H|1, nQ) int32, order (B|1, H|1, nQ, nK) int32)``: each row's distinct
    selected key blocks ascending, then its unselected blocks ascending, and how many are
    selected. Any index order in the layout works (the block mask is rebuilt); computed on the
    device (no sync) and kept while the layout's index tensors live unchanged."""
    def build():
        return dense_to_kv(layout.to_dense(), width=layout.num_k_blocks)

    return layout_memo.get(layout, "sweep_order", build)


def prepare(q, k, v, layout: BlockSparseLayout, scale: float, *, use_rho: bool = True,
            residual_dtype: torch.dtype | None = None, check: bool = False, return_lse: bool = False,
            tiles: tuple[int, int] | None = None, capability="device") -> base.Launch:
    """The fused cache-step launch (not run). ``Launch.out`` is ``(out_dense, residual | None)``,
    ``Launch.lse`` the dense lse (``return_lse``), ``Launch.rho_out`` rho (``use_rho``)."""
    b, h, sq, d = q.shape
    sk = k.shape[2]
    dev = q.device
    cap = base.device_capability(dev) if capability == "device" else capability
    cfg = tile_config(cap, d, q.dtype, layout.block_q, layout.block_k, MODE)
    if tiles is not None:
        cfg = TileConfig(tiles[0], tiles[1], cfg.num_warps, cfg.num_stages)
    bm, bn = cfg.block_m, cfg.block_n
    assert layout.block_q % bm == 0 and layout.block_k % bn == 0, "tiles must divide the layout blocks"
    n_tiles = -(-sq // bm)
    n_sel, order = sweep_order(layout)
    n_sel, order = n_sel.expand(b, h, -1), order.expand(b, h, -1, -1)

    out_d = torch.empty_like(q)
    res = torch.empty_like(q, dtype=residual_dtype) if residual_dtype is not None else None
    lse = torch.empty(b, h, sq, device=dev, dtype=torch.float32) if return_lse else None
    rho = torch.empty(b, h, sq, device=dev, dtype=torch.float32) if use_rho else None
    flag = torch.empty((), device=dev, dtype=torch.bool) if check else None
    scratch = flag_scratch(dev) if check else None
    f32_anchor = lse if lse is not None else rho if rho is not None else torch.empty(1, device=dev)
    align = row_alignment(*(t for t in (q, k, v, out_d, res) if t is not None))
    args = [
        q, k, v, out_d, res if res is not None else out_d, lse if lse is not None else f32_anchor,
        rho if rho is not None else f32_anchor, n_sel, order,
        flag if flag is not None else n_sel, scratch if scratch is not None else n_sel,
        *q.stride(), *k.stride(), *v.stride(), *out_d.stride(),
        *(res.stride() if res is not None else (0, 0, 0, 0)), *n_sel.stride(), *order.stride(),
        h, sq, sk, n_tiles, layout.num_k_blocks, scale * _LOG2E,
    ]
    constexprs = dict(
        HEAD_D=d, BLOCK_D=block_d_for(d), ALIGN=align, LAYOUT_BQ=layout.block_q, LAYOUT_BK=layout.block_k,
        BLOCK_M=bm, BLOCK_N=bn, STORE_LSE=return_lse, HAS_RHO=use_rho, HAS_RES=res is not None, CHECK=check,
        FINITE_LIMIT=base.FINITE_LIMIT[q.dtype] if check else 0.0, UPCAST=cap is None,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return base.Launch((b * h * n_tiles,), args, constexprs, cfg, (out_d, res), lse, rho, flag, kernel=cache_fwd)


def triton_fused_cache_step(q, k, v, layout, scale, use_rho=True, residual_dtype=None, check=False,
                            return_lse=False, tiles=None):
    """Re-ttention's cache step in one launch: ``(out_dense, rho, residual, finite)`` (and the
    dense lse last when ``return_lse``). ``rho`` (B, H, Sq) float32 when ``use_rho``; ``residual``
    in ``residual_dtype`` when given, else None; ``finite`` a 0-d bool for ``out_dense`` when
    ``check``, else None."""
    reason = base.unsupported_reason(q, layout)
    if reason:
        raise InputError(reason)
    launch = prepare(q, k, v, layout, scale, use_rho=use_rho, residual_dtype=residual_dtype, check=check,
                     return_lse=return_lse, tiles=tiles)
    launch.run()
    out_d, res = launch.out
    result = (out_d, launch.rho_out, res, launch.flag)
    return (*result, launch.lse) if return_lse else result
