"""Re-ttention's cache step in one Triton pass: the dense output, its lse and the statistics of
the layout's selected key blocks (rho and R) from a single sweep over every key block.

Each program (one query tile) runs one online softmax (one running max ``m``, one denominator
``l``, one accumulator) over all of its layout row's key blocks, in two groups
(:func:`sweep_order`, built once per layout on the device, no sync):

- Default (rho asked for): the unselected blocks first, then the selected ones. When the
  unselected group is done, its normalised partial output ``acc_u / l_u`` goes to R's buffer
  (the program's own tile; read back after a barrier) and ``(m_u, l_u)`` stay in registers, so
  the sweep holds one accumulator, as a plain flash pass does (a 16-bit R's rounding error is
  parked beside it in out_dense's tile, so R is rounded once). The selected group continues the
  same softmax and also sums its own share ``l_s`` (against the shared running max). At the end:
  ``O_dense = acc / l``, ``lse = m + log l``, ``rho = clamp(l_s / l, RHO_FLOOR, 1)`` and
  ``R = (acc_u / l_u) * l_u 2**(m_u - m) / l`` (= ``acc_u / l``, the unselected blocks' share of
  the dense output, which is ``O_dense - rho * O_sparse`` for the unclamped rho).
- Without rho (``R = O_dense - O_sparse``): the selected blocks first; the program keeps a copy
  of their state ``O_sparse = acc_s / l_s`` in registers (exactly the sparse pass's, the same
  blocks in the same order) while the sweep continues over the rest.

Underflow and the floor: ``l_s`` is summed against the running max of every block, so when every
selected score lies more than ~87 nats (float32's exponent range) below the row's unselected
maximum, ``l_s`` underflows to 0 and rho is RHO_FLOOR, which is what the two-pass route gives
there too (its rho would be below the floor). R does not depend on ``l_s``. When rho is clamped
up to the floor (the selected share is below 1e-6), R is ``acc_u / l`` = ``O_dense - rho_true *
O_sparse`` rather than ``O_dense - RHO_FLOOR * O_sparse``: they differ by less than
``1e-6 * |O_sparse|``. A row whose layout selects every key block has ``rho = 1`` and ``R = 0``.
The finite check covers ``O_dense`` (as the two-pass route's).
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
def _sweep(acc, m_i, l_i, l_g, q, k_base, v_base, idx_base, s_ik, t_lo, t_hi, offs_n, offs_d, d_ok,
           s_ks, s_kd, s_vs, s_vd, SEQ_K, qk_scale,
           ALIGN: tl.constexpr, LAYOUT_BK: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
           DOT_PREC: tl.constexpr, TRACK: tl.constexpr):
    """The online softmax over sweep positions [t_lo, t_hi) (key tiles of the row's ordered
    blocks); ``TRACK``: also ``l_g``, these tiles' own share of the denominator (same max)."""
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
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        qk = tl.where(n_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # qk_scale > 0
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk * qk_scale - m_new[:, None])  # one FMA a score
        row_sum = tl.sum(p, 1)
        l_i = l_i * alpha + row_sum
        if TRACK:
            l_g = l_g * alpha + row_sum
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i, l_g


@triton.jit
def _round_bf16(x):
    """float32 -> the nearest bfloat16 value (the interpreter truncates; GPUs round to even)."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def cache_fwd(
    Q, K, V, OD, R, LSE, RHO, KV_FIRST, KV_ORD, FLAG, SCRATCH,
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
    STORE_LSE: tl.constexpr, HAS_RHO: tl.constexpr, HAS_RES: tl.constexpr, SEL_FIRST: tl.constexpr,
    SPLIT: tl.constexpr, CHECK: tl.constexpr,
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
    n_first = tl.load(KV_FIRST + b * s_nb + h * s_nh + row * s_nq)
    idx_base = KV_ORD + b * s_ib + h * s_ih + row * s_iq

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # the first group (SEL_FIRST: the selected blocks, at least one; else the unselected ones,
    # maybe none). Its first tile holds a real key, so m_i is finite after it.
    acc, m_i, l_i, _unused = _sweep(acc, m_i, l_i, l_i, q, k_base, v_base, idx_base, s_ik, 0, n_first * SUB, offs_n,
                                offs_d, d_ok, s_ks, s_kd, s_vs, s_vd, SEQ_K, qk_scale, ALIGN, LAYOUT_BK, BLOCK_N,
                                UPCAST, DOT_PREC, False)
    m_a = m_i
    l_a = l_i
    if SEL_FIRST:
        o_s = acc / l_i[:, None]  # the sparse output, kept in registers
    elif HAS_RES:  # the unselected blocks' partial output, parked in R's tile (this program's own)
        part = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # none: acc is 0
        hi = part.to(R.dtype.element_ty)
        tl.store(R + tl.multiple_of(b * s_rb + h * s_rh, ALIGN) + tl.multiple_of(offs_m * s_rs, ALIGN)[:, None]
                 + offs_d[None, :] * s_rd, hi, mask=md_ok)
        if SPLIT:  # a 16-bit R: its rounding error parked in out_dense's tile, so R is rounded once
            tl.store(OD + tl.multiple_of(b * s_ob + h * s_oh, ALIGN) + tl.multiple_of(offs_m * s_os, ALIGN)[:, None]
                     + offs_d[None, :] * s_od, (part - hi.to(tl.float32)).to(OD.dtype.element_ty), mask=md_ok)
    # the second group: the same softmax continues to the dense result
    l_b = tl.zeros([BLOCK_M], tl.float32)
    acc, m_i, l_i, l_b = _sweep(acc, m_i, l_i, l_b, q, k_base, v_base, idx_base, s_ik, n_first * SUB, N_KB * SUB,
                                offs_n, offs_d, d_ok, s_ks, s_kd, s_vs, s_vd, SEQ_K, qk_scale, ALIGN, LAYOUT_BK,
                                BLOCK_N, UPCAST, DOT_PREC, not SEL_FIRST)
    o_d = acc / l_i[:, None]
    row_ptrs = bh * SEQ_Q + offs_m  # LSE and RHO: contiguous (B, H, Sq)
    if STORE_LSE:
        tl.store(LSE + row_ptrs, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=m_ok)  # ln(2)
    if HAS_RHO:  # (not SEL_FIRST) the selected blocks' share of the denominator
        tl.store(RHO + row_ptrs, tl.minimum(tl.maximum(l_b / l_i, _FLOOR), 1.0), mask=m_ok)
    if HAS_RES:
        r_ptrs = (R + tl.multiple_of(b * s_rb + h * s_rh, ALIGN) + tl.multiple_of(offs_m * s_rs, ALIGN)[:, None]
                  + offs_d[None, :] * s_rd)
        if SEL_FIRST:
            r = o_d - o_s
        else:
            tl.debug_barrier()  # the parked tile, stored by other threads of this program
            part = tl.load(r_ptrs, mask=md_ok, other=0.0).to(tl.float32)
            if SPLIT:
                part += tl.load(OD + tl.multiple_of(b * s_ob + h * s_oh, ALIGN)
                                + tl.multiple_of(offs_m * s_os, ALIGN)[:, None] + offs_d[None, :] * s_od,
                                mask=md_ok, other=0.0).to(tl.float32)
            r = part * (l_a * tl.exp2(m_a - m_i) / l_i)[:, None]
        if UPCAST:
            if R.dtype.element_ty == tl.bfloat16:
                r = _round_bf16(r)
        tl.store(r_ptrs, r.to(R.dtype.element_ty), mask=md_ok)
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
def sweep_order(layout: BlockSparseLayout, selected_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n_first (B|1, H|1, nQ) int32, order (B|1, H|1, nQ, nK) int32)``: each row's key blocks in
    two groups, each ascending: the unselected blocks then the selected ones (``selected_first``:
    the other way round), and how many are in the first group. Any index order in the layout
    works (the block mask is rebuilt; a repeated index counts once); computed on the device (no
    sync) and kept while the layout's index tensors live unchanged."""
    def build():
        mask = layout.to_dense()
        return dense_to_kv(mask if selected_first else ~mask, width=layout.num_k_blocks)

    return layout_memo.get(layout, f"sweep_order_{int(selected_first)}", build)


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
        cfg = TileConfig(tiles[0], tiles[1], cfg.num_warps, cfg.num_stages,
                         max_registers=cfg.max_registers if tuple(tiles) == (cfg.block_m, cfg.block_n) else None)
    bm, bn = cfg.block_m, cfg.block_n
    assert layout.block_q % bm == 0 and layout.block_k % bn == 0, "tiles must divide the layout blocks"
    n_tiles = -(-sq // bm)
    sel_first = residual_dtype is not None and not use_rho
    n_first, order = sweep_order(layout, sel_first)
    n_first, order = n_first.expand(b, h, -1), order.expand(b, h, -1, -1)

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
        rho if rho is not None else f32_anchor, n_first, order,
        flag if flag is not None else n_first, scratch if scratch is not None else n_first,
        *q.stride(), *k.stride(), *v.stride(), *out_d.stride(),
        *(res.stride() if res is not None else (0, 0, 0, 0)), *n_first.stride(), *order.stride(),
        h, sq, sk, n_tiles, layout.num_k_blocks, scale * _LOG2E,
    ]
    constexprs = dict(
        HEAD_D=d, BLOCK_D=block_d_for(d), ALIGN=align, LAYOUT_BQ=layout.block_q, LAYOUT_BK=layout.block_k,
        BLOCK_M=bm, BLOCK_N=bn, STORE_LSE=return_lse, HAS_RHO=use_rho, HAS_RES=res is not None, SEL_FIRST=sel_first,
        SPLIT=res is not None and not sel_first and residual_dtype != torch.float32, CHECK=check,
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
