"""GPU tier: the compiled Triton kernel at real block sizes and shapes (skipped without CUDA)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_to_truth, qkv

import rettn
from rettn import selection

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 72, 128, 256])
def test_triton_cogvideox_like_shape(dtype, head_dim):
    # 1,000 + 776 tokens: a tail block; block 128 with the Hopper tiles (128 x 64).
    q, k, v = qkv(2, 4, 1776, head_dim, dtype, "cuda", seed=head_dim)
    layout = selection.topk(q, k, keep=0.0625, block_q=128, dense_spans=[(0, 226)])
    out, lse = rettn.block_sparse_attention(q, k, v, layout, return_lse=True, backend="triton")
    assert_close_to_truth(out, lse, q, k, v, layout, floor=1e-3)


def test_auto_backend_is_triton_on_cuda():
    import rettn.attention as att

    q = torch.zeros(1, 1, 256, 64, device="cuda", dtype=torch.bfloat16)
    assert att._resolve_backend(None, q, rettn.BlockSparseLayout.dense(256, 256, device="cuda")) == "triton"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dense_attention_with_lse_on_gpu(dtype):
    q, k, v = qkv(2, 3, 1000, 64, dtype, "cuda", seed=1)
    out, lse = rettn.attention_with_lse(q, k, v)
    assert_close_to_truth(out, lse, q, k, v, floor=1e-3)
    torch.testing.assert_close(out.float(), F.scaled_dot_product_attention(q, k, v).float(),
                               atol=2e-2, rtol=2e-2)


def test_triton_and_flex_agree_on_gpu():
    q, k, v = qkv(1, 4, 2048, 64, torch.bfloat16, "cuda", seed=2)
    layout = selection.topk(q, k, keep=0.125, block_q=128)
    a = rettn.block_sparse_attention(q, k, v, layout, backend="triton").float()
    b = rettn.block_sparse_attention(q, k, v, layout, backend="flex").float()
    torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
