"""rettn's attention kernels as ``torch.library`` custom ops, so ``torch.compile`` sees one opaque
node per attention call (no graph break, no data-dependent shapes; the index tensors keep a static
shape, so new block selections between steps do not recompile).

``torch.ops.rettn.sparse_attention(q, k, v, kv_num_blocks, kv_indices, block_q, block_k, scale,
backend, return_lse, rho, residual) -> (out, lse)``:

- ``kv_num_blocks is None``: dense attention over every key (the Triton kernel's dense mode or
  the torch reference), otherwise the blocks of the layout the two tensors describe;
- ``rho`` and ``residual`` given: the output is ``rho * O_sparse + residual`` (Re-ttention's
  sparse step; fused into the Triton kernel's epilogue);
- ``out`` has q's shape, dtype and strides; ``lse`` is (B, H, Sq) float32, or empty when
  ``return_lse`` is False.

Inputs are validated by the public functions in :mod:`rettn.attention`, which call this op.
"""

from __future__ import annotations

import torch

from ..layout import BlockSparseLayout
from . import choice, dense
from .reference import masked_attention_reference
from .torch_sparse import torch_block_sparse_attention


def run(q, k, v, layout, scale, backend, return_lse, rho=None, residual=None):
    """The eager computation behind the op (also called directly in eager mode and when autograd
    is needed). ``backend``: ``"auto"`` (chosen here, at run time: :mod:`.choice`), ``"triton"``
    or ``"triton:BMxBN"`` (tiles), ``"torch"``, ``"flex"``, or ``"sdpa:<kernel>"`` (a dense kernel
    of :mod:`.dense`; only for ``layout=None`` or a layout that selects every block)."""
    if backend == "auto":
        backend = choice.resolve(q, k, v, layout, scale, return_lse, rho, residual,
                                 lambda name: run(q, k, v, layout, scale, name, return_lse, rho, residual))
    if backend[:6] == "triton":
        out, lse = choice.triton_module().triton_attention(q, k, v, layout, scale, return_lse=return_lse,
                                                  tiles=choice.parse(backend)[1], rho=rho, residual=residual)
    else:
        if backend[:5] == "sdpa:":
            out, lse = dense.attention(backend[5:], q, k, v, scale)
        elif backend == "flex":
            from ..attention import _flex_run

            out, lse = _flex_run(q, k, v, layout, scale, return_lse)
        elif backend != "torch":
            raise ValueError(f"unknown rettn backend string {backend!r}")
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
        layout = BlockSparseLayout._trusted(kv_num_blocks, kv_indices, block_q, block_k, q.shape[2], k.shape[2])
    out, lse = run(q, k, v, layout, scale, backend, return_lse, rho, residual)
    if not return_lse or lse is None:
        lse = q.new_empty(0, dtype=torch.float32)
    return out, lse


@sparse_attention.register_fake
def _(q, k, v, kv_num_blocks, kv_indices, block_q, block_k, scale, backend, return_lse, rho, residual):
    b, h, sq, _ = q.shape
    lse = q.new_empty((b, h, sq) if return_lse else (0,), dtype=torch.float32)
    return torch.empty_like(q), lse
