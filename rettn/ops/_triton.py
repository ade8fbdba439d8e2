"""The Triton backend: one flash-style forward kernel (online softmax over the selected key blocks
only) and its launcher; the launch facts that need no triton (tiles, order) are in :mod:`._tiles`.

Epilogues (``MODE``): 0, plain: the output (and optionally the lse; ``layout=None`` runs every key
block); 1, Re-ttention sparse step: ``out = clamp(rho) * O_sparse + R`` and ``rho + ramp``; 2,
cache step: ``rho = clamp(exp(lse_sparse - lse_dense), RHO_FLOOR, 1)`` and ``R = O_dense - rho *
O_sparse`` (the sparse output is never stored). Modes 1 and 2 may also write a finite flag at no
extra kernel: each program ORs "saw a NaN/inf" into a per-stream scratch word and counts itself
done; the last writes the 0-d flag and zeroes the scratch. The row alignment (largest power of two
<= 16 dividing every stride) is a hint, so head dims like 72 still get vectorised K/V loads.
Tested against ``reference.block_sparse_reference`` and :mod:`._torch` (``TRITON_INTERPRET=1`` on
CPU) and compiled ahead of time for sm_80/86/90 by :mod:`rettn.ops.aot`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from rettn.errors import InputError
from rettn.ops._tiles import (
    TileConfig,
    block_d_for,
    device_capability,
    flag_scratch,
    launch_order,
    row_alignment,
    tile_config,
    unsupported_reason,
)
from rettn.ops.layout import BlockSparseLayout
from rettn.ops.reference import RHO_FLOOR

_LOG2E = 1.4426950408889634
_FLOOR = tl.constexpr(RHO_FLOOR)
MODES = {"plain": 0, "step": 1, "cache": 2}  # the fused one-pass cache step: rettn.ops._triton_cache
# Smallest float32 magnitude that rounds (to nearest even) to inf in each dtype: the finite check
# runs on the float32 value before the store, so it sees what the stored tensor will hold.
FINITE_LIMIT = {torch.float16: 65520.0, torch.bfloat16: float(2**128 - 2**119), torch.float32: float("inf")}


@triton.jit
def attn_fwd(
    Q, K, V, O, LSE, KV_NUM, KV_IDX, ORDER,
    RHO, RES, RHO_OUT, LSE_D, FLAG, SCRATCH,
    s_qb, s_qh, s_qs, s_qd,
    s_kb, s_kh, s_ks, s_kd,
    s_vb, s_vh, s_vs, s_vd,
    s_ob, s_oh, s_os, s_od,
    s_rb, s_rh, s_rs, s_rd,
    s_nb, s_nh, s_nq,
    s_ib, s_ih, s_iq, s_ik,
    s_pb, s_ph, s_ps,
    s_lb, s_lh, s_ls,
    H, SEQ_Q, SEQ_K, N_TILES, qk_scale, ramp,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr,
    LAYOUT_BQ: tl.constexpr, LAYOUT_BK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DENSE: tl.constexpr, ORDERED: tl.constexpr, STORE_LSE: tl.constexpr, MODE: tl.constexpr,
    HAS_RHO: tl.constexpr, HAS_RES: tl.constexpr, CLAMP: tl.constexpr, RAMP: tl.constexpr,
    CHECK: tl.constexpr, FINITE_LIMIT: tl.constexpr, PREFETCH: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # RES is R (MODE 1) or O_dense (MODE 2); O is the output (MODE 0/1) or R (MODE 2).
    pid = tl.program_id(0)
    if ORDERED:
        code = tl.load(ORDER + pid)
    else:
        code = pid
    bh = code // N_TILES
    tile = code % N_TILES
    b = bh // H
    h = bh % H
    start_m = tile * BLOCK_M

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < SEQ_Q
    d_ok = offs_d < HEAD_D
    md_ok = m_ok[:, None] & d_ok[None, :]

    # Every stride but the head dim's is a multiple of ALIGN elements: the hint lets the compiler
    # vectorise rows whose length (e.g. 72) it could not otherwise prove aligned.
    q_ptrs = (Q + tl.multiple_of(b * s_qb + h * s_qh, ALIGN)
              + tl.multiple_of(offs_m * s_qs, ALIGN)[:, None] + offs_d[None, :] * s_qd)
    q = tl.load(q_ptrs, mask=md_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + tl.multiple_of(b * s_kb + h * s_kh, ALIGN)
    v_base = V + tl.multiple_of(b * s_vb + h * s_vh, ALIGN)
    r_ptrs = (RES + tl.multiple_of(b * s_rb + h * s_rh, ALIGN)
              + tl.multiple_of(offs_m * s_rs, ALIGN)[:, None] + offs_d[None, :] * s_rd)
    rho_ptrs = RHO + b * s_pb + h * s_ph + offs_m * s_ps
    if MODE == 1:
        if PREFETCH:  # issued before the loop: their latency hides behind the key blocks
            if HAS_RHO:
                rho = tl.load(rho_ptrs, mask=m_ok, other=1.0)
            if HAS_RES:
                res = tl.load(r_ptrs, mask=md_ok, other=0.0)

    SUB: tl.constexpr = LAYOUT_BK // BLOCK_N
    row = start_m // LAYOUT_BQ
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

    o_s = acc / l_i[:, None]
    lse2 = m_i + tl.log2(l_i)  # base-2 log-sum-exp of the sparse scores
    o_ptrs = (O + tl.multiple_of(b * s_ob + h * s_oh, ALIGN)
              + tl.multiple_of(offs_m * s_os, ALIGN)[:, None] + offs_d[None, :] * s_od)
    row_ptrs = bh * SEQ_Q + offs_m  # LSE and RHO_OUT: contiguous (B, H, Sq)
    if MODE == 0:
        checked = o_s
        if UPCAST:  # the interpreter truncates float32 -> bfloat16: round to nearest even as GPUs do
            if O.dtype.element_ty == tl.bfloat16:
                bits = o_s.to(tl.uint32, bitcast=True)
                o_s = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        tl.store(o_ptrs, o_s.to(O.dtype.element_ty), mask=md_ok)
    elif MODE == 1:
        out = o_s
        if HAS_RHO:
            if not PREFETCH:
                rho = tl.load(rho_ptrs, mask=m_ok, other=1.0)
            if RAMP:  # the cached rho after this step: advanced by one ramp, not clamped
                tl.store(RHO_OUT + row_ptrs, rho + ramp, mask=m_ok)
            if CLAMP:
                rho = tl.minimum(tl.maximum(rho, _FLOOR), 1.0)
            out = out * rho[:, None]
        if HAS_RES:
            if not PREFETCH:
                res = tl.load(r_ptrs, mask=md_ok, other=0.0)
            out = out + res.to(tl.float32)
        checked = out
        if UPCAST:  # as above
            if O.dtype.element_ty == tl.bfloat16:
                bits = out.to(tl.uint32, bitcast=True)
                out = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=md_ok)
    else:
        lse_d = tl.load(LSE_D + b * s_lb + h * s_lh + offs_m * s_ls, mask=m_ok, other=0.0)
        w = tl.exp2(lse2 - lse_d * 1.4426950408889634)
        w = tl.minimum(tl.maximum(w, _FLOOR), 1.0)
        if HAS_RHO:
            tl.store(RHO_OUT + row_ptrs, w, mask=m_ok)
        o_d = tl.load(r_ptrs, mask=md_ok, other=0.0).to(tl.float32)  # O_dense
        checked = o_d
        if HAS_RES:
            if HAS_RHO:
                r = o_d - w[:, None] * o_s
            else:
                r = o_d - o_s
            if UPCAST:  # as above
                if O.dtype.element_ty == tl.bfloat16:
                    bits = r.to(tl.uint32, bitcast=True)
                    r = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
            tl.store(o_ptrs, r.to(O.dtype.element_ty), mask=md_ok)
    if STORE_LSE:
        tl.store(LSE + row_ptrs, lse2 * 0.6931471805599453, mask=m_ok)  # ln(2)
    if CHECK:  # NaN, or a value that is (or rounds to) inf in the checked tensor's dtype
        x = checked
        row_bad = tl.max(tl.where(d_ok[None, :] & ~(tl.abs(x) < FINITE_LIMIT), 1, 0), 1)  # NaN fails < too
        bad = tl.max(tl.where(m_ok, row_bad, 0), 0)
        tl.atomic_or(SCRATCH + 1, bad)
        done = tl.atomic_add(SCRATCH, 1)  # acq_rel: every earlier program's OR is visible to the last
        if done == tl.num_programs(0) - 1:
            total = tl.atomic_xchg(SCRATCH + 1, 0)
            tl.atomic_xchg(SCRATCH, 0)
            tl.store(FLAG, total == 0)




# ------------------------------------------------------------------------------ launch
@dataclass
class Launch:
    """Everything one kernel launch needs: what the dispatcher chose, before the launch."""

    grid: tuple
    args: list
    constexprs: dict
    config: TileConfig
    out: torch.Tensor | None
    lse: torch.Tensor | None
    rho_out: torch.Tensor | None
    flag: torch.Tensor | None
    kernel: object = None  # the @triton.jit function (None: attn_fwd; rettn.ops._triton_cache sets its own)

    def run(self):
        kernel = attn_fwd if self.kernel is None else self.kernel
        extra = {} if self.config.max_registers is None else {"maxnreg": self.config.max_registers}
        kernel[self.grid](*self.args, **self.constexprs, num_warps=self.config.num_warps,
                          num_stages=self.config.num_stages, **extra)


def prepare(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockSparseLayout | None,
    scale: float,
    *,
    mode: str = "plain",
    return_lse: bool = False,
    rho: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    lse_dense: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    write_rho: bool = False,
    ramp: float = 0.0,
    clamp: bool = False,
    check: bool = False,
    tiles: tuple[int, int] | None = None,
    capability="device",
) -> Launch:
    """Build the launch the dispatcher would make (no launch). ``capability`` overrides the GPU
    ((major, minor)) so the ahead-of-time tier can build launches from meta tensors.

    ``mode="step"``: ``rho`` (B|1, H|1, Sq) and/or ``residual`` (B|1, H|1, Sq, D); ``ramp > 0``
    writes ``rho + ramp`` to a new tensor; ``clamp`` clamps the rho used to [RHO_FLOOR, 1].
    ``mode="cache"``: ``residual`` is O_dense, ``lse_dense`` its lse; writes rho when
    ``write_rho`` and R (``out_dtype``) when ``out_dtype`` is given.
    """
    b, h, sq, d = q.shape
    sk = k.shape[2]
    dev = q.device
    cap = device_capability(dev) if capability == "device" else capability
    dense = layout is None
    if dense:
        block_q = block_k = 128 if cap is not None else 64
    else:
        block_q, block_k = layout.block_q, layout.block_k
    cfg = tile_config(cap, d, q.dtype, block_q, block_k, mode)
    if tiles is not None:
        cfg = TileConfig(tiles[0], tiles[1], cfg.num_warps, cfg.num_stages, cfg.prefetch)
    bm, bn = cfg.block_m, cfg.block_n
    if dense:
        block_q, block_k = bm, bn
    assert block_q % bm == 0 and block_k % bn == 0, "tiles must divide the layout blocks"
    n_tiles = -(-sq // bm)

    i32 = torch.empty(1, 1, 1, 1, dtype=torch.int32, device=dev) if dense else None  # never read
    if dense:
        kv_num = kv_idx = order = i32
        n_strides, i_strides = (0, 0, 0), (0, 0, 0, 0)
    else:
        kv_num, kv_idx = _full(layout.kv_num_blocks, b, h), _full(layout.kv_indices, b, h)
        n_strides, i_strides = kv_num.stride(), kv_idx.stride()
        order = launch_order(layout, b, h, n_tiles, bm)

    has_rho = rho is not None if mode == "step" else (write_rho if mode == "cache" else False)
    has_res = residual is not None if mode == "step" else (out_dtype is not None if mode == "cache" else False)
    if mode == "cache":
        out = torch.empty_like(q, dtype=out_dtype) if has_res else None
        res_in = residual  # O_dense
    else:
        out = torch.empty_like(q)
        res_in = residual if has_res else None
    lse = torch.empty(b, h, sq, device=dev, dtype=torch.float32) if return_lse else None
    write_ramp = mode == "step" and has_rho and ramp != 0.0
    rho_out = torch.empty(b, h, sq, device=dev, dtype=torch.float32) if (
        write_ramp or (mode == "cache" and has_rho)) else None
    flag = torch.empty((), device=dev, dtype=torch.bool) if check else None
    scratch = flag_scratch(dev) if check else None

    anchor = out if out is not None else q  # a valid pointer for arguments the kernel ignores
    res_t = _full(res_in, b, h) if res_in is not None else None
    rho_t = _full(rho, b, h) if (mode == "step" and has_rho) else None
    lse_d = _full(lse_dense, b, h) if mode == "cache" else None
    f32_anchor = next((t for t in (lse, rho_out, rho_t, lse_d) if t is not None), None)
    if f32_anchor is None:
        f32_anchor = torch.empty(1, device=dev, dtype=torch.float32)
    i32_anchor = kv_num
    align = row_alignment(*(t for t in (q, k, v, out, res_t) if t is not None))

    args = [
        q, k, v, out if out is not None else anchor, lse if lse is not None else f32_anchor,
        kv_num, kv_idx, order,
        rho_t if rho_t is not None else f32_anchor, res_t if res_t is not None else anchor,
        rho_out if rho_out is not None else f32_anchor, lse_d if lse_d is not None else f32_anchor,
        flag if flag is not None else i32_anchor, scratch if scratch is not None else i32_anchor,
        *q.stride(), *k.stride(), *v.stride(),
        *(out.stride() if out is not None else (0, 0, 0, 0)),
        *(res_t.stride() if res_t is not None else (0, 0, 0, 0)),
        *n_strides, *i_strides,
        *(rho_t.stride() if rho_t is not None else (0, 0, 0)),
        *(lse_d.stride() if lse_d is not None else (0, 0, 0)),
        h, sq, sk, n_tiles, scale * _LOG2E, float(ramp),
    ]
    constexprs = dict(
        HEAD_D=d, BLOCK_D=block_d_for(d), ALIGN=align,
        LAYOUT_BQ=block_q, LAYOUT_BK=block_k, BLOCK_M=bm, BLOCK_N=bn,
        DENSE=dense, ORDERED=not dense, STORE_LSE=return_lse, MODE=MODES[mode],
        HAS_RHO=has_rho, HAS_RES=has_res, CLAMP=bool(clamp) and mode == "step", RAMP=write_ramp,
        CHECK=check, FINITE_LIMIT=FINITE_LIMIT[(residual.dtype if mode == "cache" else q.dtype)] if check else 0.0,
        PREFETCH=cfg.prefetch and (has_res or has_rho), UPCAST=cap is None,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
    )
    grid = (b * h * n_tiles,)
    return Launch(grid, args, constexprs, cfg, out, lse, rho_out, flag)


def _full(t: torch.Tensor, b: int, h: int) -> torch.Tensor:
    """``t`` (B|1, H|1, ...) broadcast to (b, h, ...) (a view; no copy)."""
    if t.shape[0] == b and t.shape[1] == h:
        return t
    return t.expand(b, h, *t.shape[2:])


def _check(q, layout):
    reason = unsupported_reason(q, layout)
    if reason:
        raise InputError(reason)


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
    _check(q, layout)
    if rho is not None:
        rho = rho.to(torch.float32)
    mode = "step" if (rho is not None or residual is not None) else "plain"
    launch = prepare(q, k, v, layout, scale, mode=mode, return_lse=return_lse, rho=rho, residual=residual,
                     tiles=tiles)
    launch.run()
    return launch.out, launch.lse


def triton_sparse_step(q, k, v, layout, scale, rho, residual, ramp=0.0, clamp=True, check=False):
    """Re-ttention's sparse step in one launch: ``(out, rho_next, finite)``.

    ``out = clamp(rho) * O_sparse + residual`` (either may be None: 1 and 0), ``rho_next = rho +
    ramp`` (None when ``ramp`` is 0 or rho is None), ``finite`` a 0-d bool (True when every output
    value is finite) or None when ``check`` is False."""
    _check(q, layout)
    if rho is not None:
        rho = rho.to(torch.float32)
    launch = prepare(q, k, v, layout, scale, mode="step", rho=rho, residual=residual, ramp=ramp, clamp=clamp,
                     check=check)
    launch.run()
    return launch.out, launch.rho_out, launch.flag


def triton_cache_step(q, k, v, layout, scale, out_dense, lse_dense, use_rho=True, residual_dtype=None,
                      check=False):
    """Re-ttention's cache-step statistics from the dense pass, in one sparse launch:
    ``(rho, residual, finite)``. ``rho`` (B, H, Sq) float32 when ``use_rho``; ``residual``
    ``O_dense - rho * O_sparse`` (``O_dense - O_sparse`` without rho) in ``residual_dtype`` when
    given, else None; ``finite`` as in :func:`triton_sparse_step`, for ``out_dense``."""
    _check(q, layout)
    launch = prepare(q, k, v, layout, scale, mode="cache", residual=out_dense, lse_dense=lse_dense,
                     out_dtype=residual_dtype, write_rho=use_rho, check=check)
    launch.run()
    return launch.rho_out, launch.out, launch.flag
