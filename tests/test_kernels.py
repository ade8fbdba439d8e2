"""Sparse and dense attention kernels against the dense-masked reference."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from helpers import assert_close_to_truth, qkv, random_layout, single_block_layout

import rettn
from rettn.kernels import torch_block_sparse_attention

BLOCK = 64
SPARSE_BACKENDS = ["torch", "triton"]


def make_layout(kind, b, h, s, block=BLOCK, seed=0):
    if kind == "random":
        return random_layout(b, h, s, s, block, seed=seed, device=DEVICE)
    if kind == "single":
        return single_block_layout(b, h, s, s, block, seed=seed, device=DEVICE)
    return rettn.BlockSparseLayout.dense(s, s, block, block, device=DEVICE)


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("seq", [77, 200, 1000])
@pytest.mark.parametrize("head_dim", [64, 72, 128])
@pytest.mark.parametrize("kind", ["random", "single", "all"])
def test_sparse_matches_masked_reference(backend, dtype, seq, head_dim, kind):
    b, h = (1, 2) if seq == 1000 else (2, 2)
    q, k, v = qkv(b, h, seq, head_dim, dtype, DEVICE, seed=seq + head_dim)
    layout = make_layout(kind, b, h, seq)
    out, lse = rettn.block_sparse_attention(q, k, v, layout, return_lse=True, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert_close_to_truth(out, lse, q, k, v, layout)


@pytest.mark.parametrize("backend", SPARSE_BACKENDS + ["flex"])
def test_keep_all_equals_dense_attention(backend):
    q, k, v = qkv(2, 3, 200, 64, device=DEVICE, seed=1)
    layout = rettn.BlockSparseLayout.dense(200, 200, BLOCK, BLOCK, device=DEVICE)
    out, lse = rettn.block_sparse_attention(q, k, v, layout, return_lse=True, backend=backend)
    dense_out, dense_lse = rettn.attention_with_lse(q, k, v)
    sdpa = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, sdpa, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out, dense_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, dense_lse, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_bfloat16(backend):
    q, k, v = qkv(1, 2, 200, 64, torch.bfloat16, DEVICE, seed=2)
    layout = make_layout("random", 1, 2, 200)
    out, lse = rettn.block_sparse_attention(q, k, v, layout, return_lse=True, backend=backend)
    assert out.dtype == torch.bfloat16
    assert_close_to_truth(out, lse, q, k, v, layout)


@pytest.mark.parametrize("backend", ["torch", "triton", "flex"])
def test_strided_bshd_view_and_scale(backend):
    b, s, h, d = 2, 130, 3, 64
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(b, s, h, d, generator=g).to(DEVICE).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    layout = random_layout(b, h, s, s, BLOCK, seed=3, device=DEVICE)
    out, lse = rettn.block_sparse_attention(q, k, v, layout, scale=0.3, return_lse=True, backend=backend)
    assert_close_to_truth(out, lse, q, k, v, layout, scale=0.3)


@pytest.mark.parametrize("backend", ["torch", "triton", "flex"])
def test_flex_backend_and_others_agree_on_random_layout(backend):
    q, k, v = qkv(2, 2, 333, 72, device=DEVICE, seed=4)
    layout = random_layout(2, 2, 333, 333, BLOCK, density=0.2, seed=4, device=DEVICE)
    out, lse = rettn.block_sparse_attention(q, k, v, layout, return_lse=True, backend=backend)
    assert_close_to_truth(out, lse, q, k, v, layout)


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_broadcast_layout_and_cross_attention(backend):
    # One (1, 1) layout for every batch row and head; seq_q != seq_k; block_q != block_k.
    q, k, v = qkv(2, 3, 150, 64, device=DEVICE, seed=5, seq_k=300)
    mask = torch.rand(1, 1, 5, 10, generator=torch.Generator().manual_seed(5)) < 0.4
    mask[..., 0] = True
    layout = rettn.BlockSparseLayout.from_dense(mask.to(DEVICE), 32, 32, 150, 300)
    out, lse = rettn.block_sparse_attention(q, k, v, layout, return_lse=True, backend=backend)
    assert_close_to_truth(out, lse, q, k, v, layout.expand(2, 3))


def test_compiled_flex_without_lse_follows_changing_layouts():
    # Without lse the flex backend runs compiled FlexAttention (also on CPU); a new layout of the
    # same shape must give the new answer, not a cached one.
    q, k, v = qkv(1, 2, 200, 64, device=DEVICE, seed=11)
    for seed in (11, 12):
        layout = random_layout(1, 2, 200, 200, BLOCK, density=0.3, seed=seed, device=DEVICE)
        out = rettn.block_sparse_attention(q, k, v, layout, backend="flex")
        assert_close_to_truth(out, None, q, k, v, layout)


def test_triton_tiles_smaller_than_layout_blocks():
    from rettn.kernels.triton_sparse import triton_attention

    q, k, v = qkv(1, 2, 300, 64, device=DEVICE, seed=6)
    layout = random_layout(1, 2, 300, 300, 128, seed=6, device=DEVICE)
    out, lse = triton_attention(q, k, v, layout, 64**-0.5, return_lse=True, tiles=(64, 32))
    assert_close_to_truth(out, lse, q, k, v, layout)


def test_torch_path_chunking_gives_same_result():
    q, k, v = qkv(2, 2, 500, 64, seed=7)
    layout = random_layout(2, 2, 500, 500, BLOCK, seed=7)
    full, lse_full = torch_block_sparse_attention(q, k, v, layout, 0.125, True)
    tiny, lse_tiny = torch_block_sparse_attention(q, k, v, layout, 0.125, True, budget=1)
    torch.testing.assert_close(full, tiny, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse_full, lse_tiny, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", [None, "torch", "triton", "flex"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 72])
def test_attention_with_lse(backend, dtype, head_dim):
    q, k, v = qkv(2, 2, 77, head_dim, dtype, DEVICE, seed=8)
    out, lse = rettn.attention_with_lse(q, k, v, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (2, 2, 77)
    assert_close_to_truth(out, lse, q, k, v)


def test_attention_with_lse_strided_and_scale():
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 90, 4, 64, generator=g).to(DEVICE).transpose(1, 2) for _ in range(3))
    out, lse = rettn.attention_with_lse(q, k, v, scale=0.2)
    assert_close_to_truth(out, lse, q, k, v, scale=0.2)


def test_lse_meaning_is_log_softmax_denominator():
    q, k, v = qkv(1, 1, 50, 64, seed=10)
    _, lse = rettn.attention_with_lse(q, k, v)
    scores = (q @ k.transpose(-1, -2)) * 64**-0.5
    torch.testing.assert_close(lse, torch.log(torch.exp(scores).sum(-1)), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------- errors
def test_bad_inputs_give_clear_errors():
    q, k, v = qkv(1, 2, 100, 64)
    layout = random_layout(1, 2, 100, 100, BLOCK)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        rettn.block_sparse_attention(q, k, v, layout, backend="cuda")
    with pytest.raises(ValueError, match="seq_q=100"):
        rettn.block_sparse_attention(q[:, :, :90], k, v, layout)
    with pytest.raises(ValueError, match="4-D"):
        rettn.block_sparse_attention(q[0], k, v, layout)
    with pytest.raises(TypeError, match="share a dtype"):
        rettn.block_sparse_attention(q.half(), k, v, layout)
    with pytest.raises(ValueError, match="batch=1, heads=2"):
        rettn.block_sparse_attention(*qkv(1, 3, 100, 64), layout)
    with pytest.raises(TypeError, match="BlockSparseLayout"):
        rettn.block_sparse_attention(q, k, v, layout.to_dense())
    with pytest.raises(ValueError, match="head dim"):
        rettn.attention_with_lse(q, k, v[..., :32])
    with pytest.raises(ValueError, match="scale must be positive"):
        rettn.attention_with_lse(q, k, v, scale=-1.0)


def test_triton_backend_rejects_what_it_cannot_run():
    q, k, v = qkv(1, 2, 100, 64, device=DEVICE)
    odd = rettn.BlockSparseLayout.dense(100, 100, 24, 24, device=DEVICE)
    with pytest.raises(ValueError, match="power-of-two block sizes"):
        rettn.block_sparse_attention(q, k, v, odd, backend="triton")
    # The torch path takes any block size.
    out = rettn.block_sparse_attention(q, k, v, odd, backend="torch")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=2e-5, rtol=1e-4)


def test_missing_triton_is_a_clear_error(monkeypatch):
    import rettn.attention as att

    monkeypatch.setattr(att, "triton_installed", lambda: False)
    q, k, v = qkv(1, 1, 64, 64)
    with pytest.raises(RuntimeError, match="needs the triton package"):
        rettn.block_sparse_attention(q, k, v, rettn.BlockSparseLayout.dense(64, 64, 64, 64), backend="triton")
    # auto falls back to the torch path
    out = rettn.block_sparse_attention(q, k, v, rettn.BlockSparseLayout.dense(64, 64, 64, 64))
    assert torch.isfinite(out).all()


def test_auto_backend_on_cpu_is_torch():
    import rettn.attention as att

    q = torch.zeros(1, 1, 64, 64)
    assert att._resolve_backend(None, q, rettn.BlockSparseLayout.dense(64, 64, 64, 64)) == "torch"


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rescaled_sparse_step_matches_formula(backend, dtype):
    q, k, v = qkv(2, 2, 200, 72, dtype, DEVICE, seed=13)
    layout = random_layout(2, 2, 200, 200, BLOCK, seed=13, device=DEVICE)
    g = torch.Generator().manual_seed(13)
    rho = torch.rand(2, 2, 200, generator=g).to(DEVICE)
    residual = torch.randn(2, 2, 200, 72, generator=g).to(DEVICE, dtype)
    out = rettn.attention.sparse_attention_rescaled(q, k, v, layout, rho, residual, backend=backend)
    plain = rettn.block_sparse_attention(q, k, v, layout, backend="torch").float()
    expected = rho.unsqueeze(-1) * plain + residual.float()
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
@pytest.mark.parametrize("head_dim", [32, 48, 96, 256])
def test_other_head_dims(backend, head_dim):
    q, k, v = qkv(1, 2, 130, head_dim, device=DEVICE, seed=head_dim)
    layout = make_layout("random", 1, 2, 130)
    out, lse = rettn.block_sparse_attention(q, k, v, layout, return_lse=True, backend=backend)
    assert_close_to_truth(out, lse, q, k, v, layout)
