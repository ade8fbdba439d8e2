"""GPU tier: the Triton kernel at the GPU's block size (128) with the real layout (text tokens
first, their rows and columns dense), against the fp64 truth.

Runs on CUDA, and is skipped on CPU-only machines, except in the GPU check's rehearsal
(``scripts/gpu_check.sh --rehearse`` sets ``RETTN_GPU_TIER=interpret``): there the same tests run
on CPU under the Triton interpreter at shorter sequences, so a broken test shows on CPU first.

Trimmed to what the GPU check compiles in its budget (each distinct dtype / head dim / flag set is
one Triton compile, 1-10 s for 16-bit, 10-60 s for fp32): bf16 and fp16 at head dims 64, 72 and
128 with lse; fp32 and head dim 256 once each; the sparse step's rescaled kernel; the dense
kernel with lse; FlexAttention's agreement; fp16 overflow and padding rows (test_safety's
checks at block 128). ``scripts/gpu_check.sh --rehearse`` prints the list of specialisations.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_to_truth, qkv
from test_safety import check_fp16_scores_beyond_fp16_range, check_rows_whose_selected_block_is_nearly_all_padding

import rettn
from rettn.ops import selection

ON_CUDA = torch.cuda.is_available()
REHEARSE = not ON_CUDA and os.environ.get("RETTN_GPU_TIER") == "interpret"
DEV = "cuda" if ON_CUDA else "cpu"
BLOCK = 128
# CUDA: 226 text + 1,550 video tokens (a tail block); the rehearsal: 26 + 278, three blocks.
# Sequence lengths are multiples of 16 where a test allows, as at the real shape (17,776): the
# JIT compiles another variant for lengths that are not.
B, H, SEQ, TEXT = (2, 4, 1776, 226) if ON_CUDA else (1, 2, 304, 26)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (ON_CUDA or REHEARSE), reason="needs a CUDA GPU (or RETTN_GPU_TIER=interpret "
                       "with TRITON_INTERPRET=1: the GPU check's CPU rehearsal)"),
]


def _real_layout(q, k, keep=0.0625):
    return selection.topk(q, k, keep=keep, block_q=BLOCK, dense_spans=[(0, TEXT)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 72, 128])
def test_sparse_with_lse_real_layout(dtype, head_dim):
    q, k, v = qkv(B, H, SEQ, head_dim, dtype, DEV, seed=head_dim)
    layout = _real_layout(q, k)
    out, lse = rettn.block_sparse_attention(q, k, v, layout, return_lse=True, backend="triton")
    assert_close_to_truth(out, lse, q, k, v, layout, floor=1e-3)


@pytest.mark.parametrize("dtype,head_dim", [(torch.float32, 64), (torch.bfloat16, 256)])
def test_sparse_with_lse_once(dtype, head_dim):
    """fp32 and head dim 256: one compile each."""
    q, k, v = qkv(B, H, SEQ, head_dim, dtype, DEV, seed=head_dim + 1)
    layout = _real_layout(q, k)
    out, lse = rettn.block_sparse_attention(q, k, v, layout, return_lse=True, backend="triton")
    assert_close_to_truth(out, lse, q, k, v, layout, floor=1e-3 if dtype != torch.float32 else 1e-5)


def test_sparse_step_kernels():
    """The sparse step's two kernels: plain sparse attention (no lse) and rho * O + R fused."""
    q, k, v = qkv(B, H, SEQ, 64, torch.bfloat16, DEV, seed=3)
    layout = _real_layout(q, k, keep=0.03125)
    plain = rettn.block_sparse_attention(q, k, v, layout, backend="triton")
    assert_close_to_truth(plain, None, q, k, v, layout, floor=1e-3)
    g = torch.Generator().manual_seed(3)
    rho = (0.5 + 0.5 * torch.rand(B, H, SEQ, generator=g)).to(DEV)
    residual = (0.1 * torch.randn(B, H, SEQ, 64, generator=g)).to(DEV, torch.bfloat16)
    out = rettn.ops.attention.sparse_attention_rescaled(q, k, v, layout, rho, residual, backend="triton")
    assert out.dtype == torch.bfloat16
    expected = rho.unsqueeze(-1) * plain.float() + residual.float()
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dense_attention_with_lse(dtype):
    """The default path (PyTorch's flash kernels, which return the lse), and for bf16 the Triton
    dense kernel."""
    q, k, v = qkv(B, 3, SEQ, 64, dtype, DEV, seed=1)
    backends = [None, "triton"] if dtype == torch.bfloat16 else [None]
    for backend in backends:
        out, lse = rettn.attention_with_lse(q, k, v, backend=backend)
        assert_close_to_truth(out, lse, q, k, v, floor=1e-3)
        torch.testing.assert_close(out.float(), F.scaled_dot_product_attention(q, k, v).float(),
                                   atol=2e-2, rtol=2e-2)


def test_triton_and_flex_agree():
    """Same layout, same answer (with lse: the cache step's path; compiled FlexAttention on CUDA)."""
    q, k, v = qkv(1, 4, 2048 if ON_CUDA else SEQ, 64, torch.bfloat16, DEV, seed=2)
    layout = selection.topk(q, k, keep=0.125, block_q=BLOCK)
    a, lse_a = rettn.block_sparse_attention(q, k, v, layout, return_lse=True, backend="triton")
    b, lse_b = rettn.block_sparse_attention(q, k, v, layout, return_lse=True, backend="flex")
    torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse_a, lse_b, atol=2e-2, rtol=1e-3)


def test_fp16_scores_beyond_fp16_range_at_gpu_block():
    check_fp16_scores_beyond_fp16_range("triton", DEV, block=BLOCK, seq=SEQ)


def test_padding_rows_at_gpu_block():
    check_rows_whose_selected_block_is_nearly_all_padding("triton", DEV, block=BLOCK, dtype=torch.bfloat16)


@pytest.mark.skipif(not ON_CUDA, reason="auto picks the torch path for CPU tensors (tests/test_kernels.py "
                    "::test_auto_backend_on_cpu_is_torch)")
def test_auto_backend_is_triton_on_cuda():
    import rettn.ops.attention as att

    q = torch.zeros(1, 1, 256, 64, device="cuda", dtype=torch.bfloat16)
    assert att.resolve_backend(None, q, rettn.BlockSparseLayout.dense(256, 256, device="cuda")) == "triton"
