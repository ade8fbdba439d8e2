"""BlockSparseLayout: construction, validation, views, density, FlexAttention conversion."""

import pytest
import torch
from helpers import random_layout

from rettn import BlockSparseLayout


def test_from_dense_round_trip_and_sorted_indices():
    mask = torch.tensor([[[[True, False, True], [False, True, False]]]])  # (1, 1, 2, 3)
    lay = BlockSparseLayout.from_dense(mask, 16, 16, 32, 40)
    assert lay.kv_num_blocks.tolist() == [[[2, 1]]]
    assert lay.kv_indices[0, 0, 0].tolist() == [0, 2]
    assert lay.kv_indices[0, 0, 1, 0].item() == 1
    assert lay.kv_num_blocks.dtype == lay.kv_indices.dtype == torch.int32
    assert torch.equal(lay.to_dense(), mask)


def test_random_round_trip():
    lay = random_layout(2, 3, 300, 200, 32, seed=1)
    again = BlockSparseLayout.from_dense(lay.to_dense(), 32, 32, 300, 200)
    assert torch.equal(again.to_dense(), lay.to_dense())
    assert torch.equal(again.kv_num_blocks, lay.kv_num_blocks)


def test_density_counts_real_tokens():
    # seq 100, block 64: blocks hold 64 and 36 tokens. Diagonal only.
    mask = torch.eye(2, dtype=torch.bool).view(1, 1, 2, 2)
    lay = BlockSparseLayout.from_dense(mask, 64, 64, 100, 100)
    assert lay.density() == pytest.approx((64 * 64 + 36 * 36) / 100**2)
    # Row 0 takes both blocks, row 1 only the tail block; averaged over two heads.
    mask2 = torch.tensor([[[[True, True], [False, True]], [[True, False], [False, True]]]])
    lay2 = BlockSparseLayout.from_dense(mask2, 64, 64, 100, 100)
    head0 = (64 * 100 + 36 * 36) / 100**2
    head1 = (64 * 64 + 36 * 36) / 100**2
    assert lay2.density() == pytest.approx((head0 + head1) / 2)
    assert BlockSparseLayout.dense(100, 70, 64, 32).density() == pytest.approx(1.0)


def test_empty_row_is_an_error_at_construction():
    mask = torch.tensor([[[[True, False], [False, False]]]])
    with pytest.raises(ValueError, match="query block 1 .* attends no key block"):
        BlockSparseLayout.from_dense(mask, 64, 64, 128, 128)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block_q=0), "block_q must be a positive integer"),
        (dict(block_k=-8), "block_k must be a positive integer"),
        (dict(seq_q=129), "needs 3"),
        (dict(kv_indices=torch.full((1, 1, 2, 1), 5, dtype=torch.int32)), r"must lie in \[0, 2\)"),
        (dict(kv_num_blocks=torch.ones(1, 1, 2, dtype=torch.int64)), "must be int32"),
        (dict(kv_num_blocks=torch.full((1, 1, 2), 3, dtype=torch.int32)), "larger than kv_indices"),
    ],
)
def test_bad_layouts_are_rejected(kwargs, match):
    args = dict(
        kv_num_blocks=torch.ones(1, 1, 2, dtype=torch.int32),
        kv_indices=torch.zeros(1, 1, 2, 1, dtype=torch.int32),
        block_q=64, block_k=64, seq_q=128, seq_k=128,
    )
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        BlockSparseLayout(**args)


def test_from_dense_checks_shape():
    with pytest.raises(ValueError, match=r"need \(2, 2\)"):
        BlockSparseLayout.from_dense(torch.ones(1, 1, 3, 2, dtype=torch.bool), 64, 64, 128, 128)
    with pytest.raises(TypeError, match="bool"):
        BlockSparseLayout.from_dense(torch.ones(1, 1, 2, 2), 64, 64, 128, 128)


def test_expand_broadcasts_and_rejects_mismatch():
    lay = BlockSparseLayout.dense(100, 100, 32, 32)
    big = lay.expand(2, 5)
    assert big.kv_num_blocks.shape == (2, 5, 4)
    assert torch.equal(big.to_dense()[1, 4], lay.to_dense()[0, 0])
    with pytest.raises(ValueError, match="cannot be used"):
        random_layout(2, 3, 64, 64, 32).expand(2, 4)


def test_block_mask_conversion_matches_layout():
    lay = random_layout(2, 3, 200, 150, 64, seed=2)
    bm = lay.to_block_mask()
    assert bm.shape == (2, 3, 200, 150)
    # Full and partial blocks together are exactly the layout.
    assert torch.equal(bm.to_dense().bool(), lay.to_dense())
    # The mask_mod encodes the layout at token level.
    b = torch.tensor(1)
    h = torch.tensor(2)
    dense = lay.to_dense()
    for qi, ki in [(0, 0), (70, 130), (199, 149), (130, 10)]:
        expected = bool(dense[1, 2, qi // 64, ki // 64])
        assert bool(bm.mask_mod(b, h, torch.tensor(qi), torch.tensor(ki))) == expected


def test_repr_is_readable():
    text = repr(BlockSparseLayout.dense(100, 100, 64, 64))
    assert "seq_q=100" in text and "density=1.0000" in text
