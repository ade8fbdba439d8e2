"""Shared test helpers: random inputs, layouts and the dtype-aware tolerance rule."""

import torch

import rettn
from rettn.ops.reference import layout_token_mask, masked_attention_reference


def qkv(b, h, s, d, dtype=torch.float32, device="cpu", seed=0, seq_k=None):
    g = torch.Generator(device="cpu").manual_seed(seed)
    shapes = [(b, h, s, d), (b, h, seq_k or s, d), (b, h, seq_k or s, d)]
    return [torch.randn(*sh, generator=g).to(device=device, dtype=dtype) for sh in shapes]


def random_layout(b, h, seq_q, seq_k, block, density=0.3, seed=0, device="cpu"):
    """Random block mask with at least one block per row."""
    g = torch.Generator().manual_seed(seed)
    nq, nk = -(-seq_q // block), -(-seq_k // block)
    mask = torch.rand(b, h, nq, nk, generator=g) < density
    forced = torch.randint(0, nk, (b, h, nq, 1), generator=g)
    mask.scatter_(-1, forced, True)
    return rettn.BlockSparseLayout.from_dense(mask.to(device), block, block, seq_q, seq_k)


def single_block_layout(b, h, seq_q, seq_k, block, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    nq, nk = -(-seq_q // block), -(-seq_k // block)
    idx = torch.randint(0, nk, (b, h, nq, 1), generator=g, dtype=torch.int32)
    n = torch.ones(b, h, nq, dtype=torch.int32)
    return rettn.BlockSparseLayout(n.to(device), idx.to(device), block, block, seq_q, seq_k)


def reference(q, k, v, layout=None, scale=None, dtype=torch.float64):
    """Reference output and lse computed in ``dtype`` (float64 for the truth)."""
    mask = None if layout is None else layout_token_mask(layout.to(q.device))
    out, lse = masked_attention_reference(q, k, v, mask, scale, compute_dtype=dtype)
    return out.to(torch.float64), lse.to(torch.float64)


def assert_close_to_truth(out, lse, q, k, v, layout=None, scale=None, floor=1e-5):
    """err(result, fp64 truth) <= 2 * err(torch in q's dtype, fp64 truth) + floor, for out and lse."""
    q64, k64, v64 = (t.double() for t in (q, k, v))
    true_out, true_lse = reference(q64, k64, v64, layout, scale)
    ref_out, ref_lse = reference(q, k, v, layout, scale, dtype=q.dtype)
    out_err = (out.double() - true_out).abs().max().item()
    out_base = (ref_out - true_out).abs().max().item()
    assert out_err <= 2 * out_base + floor, f"out error {out_err:.3g} vs torch {out_base:.3g}"
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
        lse_err = (lse.double() - true_lse).abs().max().item()
        lse_base = (ref_lse - true_lse).abs().max().item()
        assert lse_err <= 2 * lse_base + floor, f"lse error {lse_err:.3g} vs torch {lse_base:.3g}"
