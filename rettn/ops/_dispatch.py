"""Dispatch: which backend a call runs (named, or ``"auto"`` through :mod:`._choice`) and the
backends behind ``torch.library`` custom ops, so ``torch.compile`` sees one opaque node per
attention call (no graph break, no data-dependent shapes; the index tensors keep a static shape,
so new block selections between steps do not recompile).

``torch.ops.rettn.sparse_attention(q, k, v, kv_num_blocks, kv_indices, block_q, block_k, scale,
backend, return_lse, rho, residual) -> (out, lse)``:

- ``kv_num_blocks is None``: dense attention over every key (the Triton kernel's dense mode or
  the torch reference), otherwise the blocks of the layout the two tensors describe;
- ``rho`` and ``residual`` given: the output is ``rho * O_sparse + residual`` (Re-ttention's
  sparse step; fused into the Triton kernel's epilogue);
- ``out`` has q's shape, dtype and strides; ``lse`` is (B, H, Sq) float32, or empty when
  ``return_lse`` is False.

``torch.ops.rettn.sparse_step(q, k, v, kv_num_blocks, kv_indices, block_q, block_k, scale,
backend, rho, residual, ramp, clamp, check) -> (out, rho_next, finite)``: Re-ttention's sparse
step, ``out = clamp(rho) * O_sparse + residual``, ``rho_next = rho + ramp`` and a 0-d bool
``finite`` (one Triton launch; empty outputs where not asked for).

The engine's cache step is ``rettn::cache_pass`` (:mod:`._cache_pass`: the one-pass kernel, or
the dense pass then :func:`run_cache_step`, the statistics launch).

Inputs are validated by the public functions in :mod:`rettn.ops.attention`, which call these ops.
"""

from __future__ import annotations

import functools

import torch

from rettn.errors import InputError, UnsupportedError
from rettn.ops import _choice as choice
from rettn.ops import _dense as dense
from rettn.ops._candidates import parse
from rettn.ops._flex import flex_attention, flex_function
from rettn.ops._tiles import interpreting, triton_installed
from rettn.ops._torch import torch_block_sparse_attention
from rettn.ops.layout import BlockSparseLayout, trusted_layout
from rettn.ops.reference import cache_statistics, masked_attention_reference, step_rho

BACKENDS = ("triton", "torch", "flex")


# ------------------------------------------------------------------ which backend a call runs
@functools.lru_cache(maxsize=None)
def _triton_module():
    """``rettn.ops._triton``, imported at first use (it imports triton)."""
    from rettn.ops import _triton

    return _triton


def _triton_backend():
    if not triton_installed():
        raise UnsupportedError("backend='triton' needs the triton package (pip install triton)")
    return _triton_module()


def auto(q) -> str:
    """What ``backend=None`` passes on: ``"auto"`` (chosen at run time, inside the op) where the
    chooser measures or on CUDA; the torch path on CPU otherwise (no per-call lookup)."""
    if q.device.type == "cuda" or choice.measures_cpu():
        return "auto"
    return "torch"


def auto_dense(q) -> str:
    """:func:`auto` for dense attention with lse: on CPU without measurement, PyTorch's CPU flash
    kernel where this torch has it."""
    backend = auto(q)
    if backend == "torch" and q.device.type == "cpu" and dense.CPU_AVAILABLE:
        return "sdpa:cpu"
    return backend


def auto_backend(q, layout) -> str:
    """The backend an auto sparse call of this shape runs: the stored choice once one was made
    (``"triton:128x64"``, ``"flex"``, ...), else ``"auto"`` (CUDA: chosen at the first call) or
    ``"torch"``. Measures nothing (reports use it)."""
    name = auto(q)
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
    key = (dev, q.dtype, q.shape[-1], blocks, dev != "cuda" and interpreting())
    reason = _triton_reasons.get(key, False)
    if reason is False:
        reason = _triton_backend().unsupported_reason(q, layout)  # the module's: scripts patch it there
        if reason is None and q.device.type == "cuda" and q.dtype == torch.float32:
            reason = _FP32_TRITON
        if not torch.compiler.is_compiling():  # no side effects in traced code
            _triton_reasons[key] = reason
    return reason


def resolve_backend(backend, q, layout) -> str:
    """The backend string a public call passes on: ``None``/``"auto"`` as :func:`auto`; a named
    backend checked here (InputError for an unknown name or inputs the Triton kernel refuses,
    UnsupportedError for a missing package)."""
    if backend is None or backend == "auto":
        return auto(q)
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; expected one of {BACKENDS} or None (auto)")
    if backend == "triton":
        if not triton_installed():
            _triton_backend()  # the error
        reason = _triton_reason(q, layout)
        if reason:
            raise InputError(reason)
    if backend == "flex":
        flex_function()
    return backend


def needs_autograd(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _plain_eager(q) -> bool:
    """Eager code on plain tensors, no dispatch mode: the custom op's dispatch (~30 us of host
    time per call) would add nothing there."""
    return (not torch.compiler.is_compiling() and type(q) is torch.Tensor
            and not torch._C._len_torch_dispatch_stack())


def call(q, k, v, layout, scale, backend, return_lse, rho=None, residual=None):
    """Run the kernels through the ``rettn::sparse_attention`` custom op (one opaque node under
    torch.compile, and what fake tensors and dispatch modes see); the op's body (:func:`run`)
    directly in plain eager code and when autograd needs the torch path's graph."""
    if _plain_eager(q) or needs_autograd(q, k, v, rho, residual):
        out, lse = run(q, k, v, layout, scale, backend, return_lse, rho, residual)
        return out, (lse if return_lse else None)
    n, idx, bq, bk = (None, None, 0, 0) if layout is None else (
        layout.kv_num_blocks, layout.kv_indices, layout.block_q, layout.block_k)
    out, lse = torch.ops.rettn.sparse_attention(q, k, v, n, idx, bq, bk, scale, backend, return_lse, rho, residual)
    return out, (lse if return_lse else None)


# ------------------------------------------------------------------ the ops' eager bodies


def run(q, k, v, layout, scale, backend, return_lse, rho=None, residual=None):
    """The eager computation behind the op (also called directly in eager mode and when autograd
    is needed). ``backend``: ``"auto"`` (chosen here, at run time: :mod:`._choice`), ``"triton"``
    or ``"triton:BMxBN"`` (tiles), ``"torch"``, ``"flex"``, or ``"sdpa:<kernel>"`` (a dense kernel
    of :mod:`._dense`; only for ``layout=None`` or a layout that selects every block)."""
    if backend == "auto":
        backend = choice.resolve(q, k, v, layout, scale, return_lse, rho, residual,
                                 lambda name: run(q, k, v, layout, scale, name, return_lse, rho, residual))
    if backend[:6] == "triton":
        out, lse = _triton_module().triton_attention(q, k, v, layout, scale, return_lse=return_lse,
                                                     tiles=parse(backend)[1], rho=rho, residual=residual)
    else:
        if backend[:5] == "sdpa:":
            out, lse = dense.attention(backend[5:], q, k, v, scale)
        elif backend == "flex":
            out, lse = flex_attention(q, k, v, layout, scale, return_lse)
        elif backend != "torch":
            raise InputError(f"unknown rettn backend string {backend!r}")
        elif layout is None:
            out, lse = masked_attention_reference(q, k, v, None, scale)
        else:
            out, lse = torch_block_sparse_attention(q, k, v, layout, scale, return_lse)
        if rho is not None:
            rescaled = torch.addcmul(residual.float(), out.float(), rho.float().unsqueeze(-1))
            out = torch.empty_like(q).copy_(rescaled)
    if out.stride() != q.stride():  # the op promises q's strides (what its fake returns)
        out = torch.empty_like(q).copy_(out)
    return out, lse


@torch.library.custom_op("rettn::sparse_attention", mutates_args=())
def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num_blocks: torch.Tensor | None,
    kv_indices: torch.Tensor | None,
    block_q: int,
    block_k: int,
    scale: float,
    backend: str,
    return_lse: bool,
    rho: torch.Tensor | None,
    residual: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    layout = None
    if kv_num_blocks is not None:
        layout = trusted_layout(kv_num_blocks, kv_indices, block_q, block_k, q.shape[2], k.shape[2])
    out, lse = run(q, k, v, layout, scale, backend, return_lse, rho, residual)
    if not return_lse or lse is None:
        lse = q.new_empty(0, dtype=torch.float32)
    return out, lse


@sparse_attention.register_fake
def _(q, k, v, kv_num_blocks, kv_indices, block_q, block_k, scale, backend, return_lse, rho, residual):
    b, h, sq, _ = q.shape
    lse = q.new_empty((b, h, sq) if return_lse else (0,), dtype=torch.float32)
    return torch.empty_like(q), lse


def _layout(q, k, kv_num_blocks, kv_indices, block_q, block_k):
    if kv_num_blocks is None:
        return None
    return BlockSparseLayout(kv_num_blocks, kv_indices, block_q, block_k, q.shape[2], k.shape[2], validate=False)


def _fused_or_chosen(op_rho, op_residual, q, k, v, layout, scale, return_lse):
    """``backend="auto"`` for a fused step: the chooser's pick for the same call without the
    fusion (the rescaled step, or the sparse pass with lse); a Triton pick runs the fused kernel."""
    def candidate(name):
        return run(q, k, v, layout, scale, name, return_lse, op_rho, op_residual)

    name = choice.resolve(q, k, v, layout, scale, return_lse, op_rho, op_residual, candidate)
    return "triton" if name[:6] == "triton" else name


def run_sparse_step(q, k, v, layout, scale, backend, rho, residual, ramp=0.0, clamp=True, check=False):
    """The eager sparse step behind ``rettn::sparse_step``: ``(out, rho_next | None, finite | None)``."""
    if backend == "auto":
        b, h, s, d = q.shape
        backend = _fused_or_chosen(torch.ones(b, h, s, device=q.device) if rho is None else rho,
                                   torch.zeros((), device=q.device, dtype=q.dtype).expand(b, h, s, d)
                                   if residual is None else residual, q, k, v, layout, scale, False)
    if backend == "triton":
        return _triton_module().triton_sparse_step(q, k, v, layout, scale, rho, residual, ramp=ramp, clamp=clamp,
                                                   check=check)
    rho_next = None
    if rho is None and residual is None:
        out, _ = run(q, k, v, layout, scale, backend, False)
    else:
        b, h, s, d = q.shape
        if rho is None:
            rho_use = torch.ones(b, h, s, device=q.device)
        else:
            rho_use, rho_next = step_rho(rho, ramp, clamp)
        if residual is None:
            residual = torch.zeros((), device=q.device, dtype=q.dtype).expand(b, h, s, d)
        out, _ = run(q, k, v, layout, scale, backend, False, rho_use, residual)
    return out, rho_next, (torch.isfinite(out).all() if check else None)


def run_cache_step(q, k, v, layout, scale, backend, out_dense, lse_dense, use_rho=True, residual_dtype=None,
                   check=False):
    """A cache step's statistics from the dense pass (``rettn::cache_pass``'s ``"dense+stats"``
    route): ``(rho | None, residual | None, finite | None)``."""
    if backend == "auto":
        backend = _fused_or_chosen(None, None, q, k, v, layout, scale, True)
    if backend == "triton":
        return _triton_module().triton_cache_step(q, k, v, layout, scale, out_dense, lse_dense, use_rho=use_rho,
                                                  residual_dtype=residual_dtype, check=check)
    out_s, lse_s = run(q, k, v, layout, scale, backend, True)
    rho, residual = cache_statistics(out_dense, lse_dense, out_s, lse_s, use_rho, residual_dtype)
    return rho, residual, (torch.isfinite(out_dense).all() if check else None)


def sparse_step_outputs(q, k, v, layout, scale, backend, rho, residual, ramp=0.0, clamp=True, check=False):
    """:func:`run_sparse_step` with the op's output contract (out with q's strides, rho_next
    (B, H, Sq)): what ``rettn::sparse_step`` returns, None where it returns an empty tensor.
    Eager callers use it directly (the custom op's dispatch costs host time per call)."""
    out, rho_next, ok = run_sparse_step(q, k, v, layout, scale, backend, rho, residual, ramp, clamp, check)
    if out.stride() != q.stride():
        out = torch.empty_like(q).copy_(out)
    b, h, sq, _ = q.shape
    if rho_next is not None and tuple(rho_next.shape) != (b, h, sq):  # a broadcast rho: full, as the fake says
        rho_next = rho_next.expand(b, h, sq).contiguous()
    return out, rho_next, ok


def cache_step_outputs(q, k, v, layout, scale, backend, out_dense, lse_dense, use_rho=True, residual_dtype=None,
                       check=False):
    """:func:`run_cache_step` with the op's output contract (residual with q's strides)."""
    rho, residual, ok = run_cache_step(q, k, v, layout, scale, backend, out_dense, lse_dense, use_rho,
                                       residual_dtype, check)
    if residual is not None and residual.stride() != q.stride():
        residual = torch.empty_like(q, dtype=residual.dtype).copy_(residual)
    return rho, residual, ok


def _or_empty(t, like):
    return like.new_empty(0) if t is None else t


@torch.library.custom_op("rettn::sparse_step", mutates_args=())
def sparse_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    block_q: int,
    block_k: int,
    scale: float,
    backend: str,
    rho: torch.Tensor | None,
    residual: torch.Tensor | None,
    ramp: float,
    clamp: bool,
    check: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    layout = _layout(q, k, kv_num_blocks, kv_indices, block_q, block_k)
    out, rho_next, ok = sparse_step_outputs(q, k, v, layout, scale, backend, rho, residual, ramp, clamp, check)
    f32 = q.new_empty(0, dtype=torch.float32)
    return out, _or_empty(rho_next, f32), _or_empty(ok, q.new_empty(0, dtype=torch.bool))


@sparse_step.register_fake
def _(q, k, v, kv_num_blocks, kv_indices, block_q, block_k, scale, backend, rho, residual, ramp, clamp, check):
    b, h, sq, _ = q.shape
    rho_next = q.new_empty((b, h, sq) if (rho is not None and ramp) else (0,), dtype=torch.float32)
    ok = q.new_empty(() if check else (0,), dtype=torch.bool)
    return torch.empty_like(q), rho_next, ok
