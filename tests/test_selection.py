"""Block selection: exact indices on hand-made cases, density, dense spans, bad arguments."""

import pytest
import torch
import torch.nn.functional as F

from rettn.ops import selection


def rows(layout, b=0, h=0):
    """Selected key blocks per query block, as lists."""
    n, idx = layout.kv_num_blocks[b, h], layout.kv_indices[b, h]
    return [idx[r, : n[r]].tolist() for r in range(len(n))]


def blocky(directions, block, dim=4):
    """(1, 1, len*block, dim) where every token of block j is the unit vector e_directions[j]."""
    x = torch.zeros(len(directions) * block, dim)
    for j, d in enumerate(directions):
        x[j * block : (j + 1) * block, d] = 1.0
    return x.view(1, 1, -1, dim)


def test_topk_keeps_best_pooled_blocks_and_the_diagonal():
    # Key blocks point along e0..e3; query block r points along e_{(r+2) % 4}: its best key block
    # is (r + 2) % 4, and the diagonal r is added.
    k = blocky([0, 1, 2, 3], block=8)
    q = blocky([2, 3, 0, 1], block=8)
    lay = selection.topk(q, k, keep=0.5, block_q=8)  # ceil(0.5 * 4) = 2 blocks
    assert rows(lay) == [[0, 2], [1, 3], [0, 2], [1, 3]]
    one = selection.topk(q, k, keep=0.25, block_q=8)  # 1 block: the diagonal wins
    assert rows(one) == [[0], [1], [2], [3]]


def test_topk_is_per_head_and_batch():
    # Key block j of head 0 is c_j * e0 with c = (1, 4, 2, 3); head 1 has c = (4, 1, 3, 2).
    # Queries are +e0 in batch 0 and -e0 in batch 1, so the rankings differ per (batch, head).
    k = torch.zeros(2, 2, 32, 4)
    for h, c in enumerate([(1, 4, 2, 3), (4, 1, 3, 2)]):
        for j, cj in enumerate(c):
            k[:, h, j * 8 : (j + 1) * 8, 0] = cj
    q = torch.zeros(2, 2, 32, 4)
    q[0, ..., 0], q[1, ..., 0] = 1.0, -1.0
    lay = selection.topk(q, k, keep=0.5, block_q=8)  # diagonal + the best other block
    assert rows(lay, 0, 0) == [[0, 1], [1, 3], [1, 2], [1, 3]]
    assert rows(lay, 0, 1) == [[0, 2], [0, 1], [0, 2], [0, 3]]
    assert rows(lay, 1, 0) == [[0, 2], [0, 1], [0, 2], [0, 3]]
    assert rows(lay, 1, 1) == [[0, 1], [1, 3], [1, 2], [1, 3]]


def test_topk_counts_and_tail_blocks():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 1000, 64, generator=g), torch.randn(2, 3, 1000, 64, generator=g)
    lay = selection.topk(q, k, keep=1 / 16, block_q=64)  # 16 blocks, the last holds 40 tokens
    assert lay.num_k_blocks == 16 and lay.max_kv == 1
    diag = torch.arange(16, dtype=torch.int32).view(1, 1, 16)
    assert torch.equal(lay.kv_indices[..., 0], diag.expand(2, 3, 16))
    assert lay.density() == pytest.approx((15 * 64 * 64 + 40 * 40) / 1000**2)
    three = selection.topk(q, k, keep=0.15, block_q=64)  # ceil(2.4) = 3
    assert (three.kv_num_blocks == 3).all()
    d = three.to_dense()
    assert d[:, :, torch.arange(16), torch.arange(16)].all()


def test_pooling_uses_real_tail_size():
    # Blocks of 8, 8 and 3 tokens: e0, 0.5 * e1, and a tail of e1. Divided by its real size the
    # tail pools to e1 (the best match for a query along e1); divided by 8 it would pool to
    # 0.375 * e1 and lose to block 1.
    k = torch.zeros(1, 1, 19, 4)
    k[0, 0, :8, 0] = 1.0
    k[0, 0, 8:16, 1] = 0.5
    k[0, 0, 16:, 1] = 1.0
    q = torch.zeros(1, 1, 19, 4)
    q[0, 0, :, 1] = 5.0
    lay = selection.topk(q, k, keep=0.6, block_q=8)  # ceil(1.8) = 2 blocks
    assert rows(lay) == [[0, 2], [1, 2], [1, 2]]
    pooled = selection.pool_blocks(k, 8)
    assert torch.allclose(pooled[0, 0, 2], torch.tensor([0.0, 1.0, 0.0, 0.0]))


def test_topk_mass_stops_at_threshold():
    k = blocky([0, 1, 2, 3], block=8)
    q = torch.zeros_like(k)
    q[..., 3] = 40.0  # every query block points hard at key block 3
    lay = selection.topk_mass(q, k, mass=0.9, block_q=8)
    assert rows(lay) == [[0, 3], [1, 3], [2, 3], [3]]
    everything = selection.topk_mass(torch.zeros_like(k), k, mass=1.0, block_q=8)
    assert rows(everything) == [[0, 1, 2, 3]] * 4
    capped = selection.topk_mass(torch.zeros_like(k), k, mass=1.0, max_keep=0.5, block_q=8)
    assert all(len(r) in (2, 3) for r in rows(capped))  # 2 best (ties) + the diagonal


def test_window_band_with_shifted_edges():
    lay = selection.window(160, keep=0.3, block_size=16)  # 10 blocks, keep 3
    assert lay.kv_num_blocks.shape == (1, 1, 10)
    r = rows(lay)
    assert r[0] == [0, 1, 2] and r[5] == [4, 5, 6] and r[9] == [7, 8, 9]
    assert all(len(x) == 3 for x in r)
    full = selection.window(100, keep=1.0, block_size=16)
    assert full.density() == pytest.approx(1.0)


def brute_frame_window(frames, h, w, half, block, video_start, seq_len):
    per = h * w
    tok = torch.zeros(seq_len, seq_len, dtype=torch.bool)
    vid = torch.arange(frames * per)
    pos = vid % per
    near = (pos[:, None] - pos[None, :]).abs() <= half
    s = video_start
    tok[s : s + frames * per, s : s + frames * per] = near
    cond = torch.ones(seq_len, dtype=torch.bool)
    cond[s : s + frames * per] = False
    tok[cond] = True
    tok[:, cond] = True
    nb = -(-seq_len // block)
    pad = F.pad(tok, (0, nb * block - seq_len, 0, nb * block - seq_len))
    return pad.view(nb, block, nb, block).any(3).any(1)


@pytest.mark.parametrize("video_start, extra", [(0, 0), (10, 0), (0, 7), (5, 9)])
def test_frame_window_matches_token_level_pattern(video_start, extra):
    grid = (3, 4, 6)  # 72 video tokens, 24 per frame
    seq = video_start + 72 + extra
    lay = selection.frame_window(grid, keep=0.1, block_size=8, video_start=video_start, seq_len=seq,
                                 half_width=2)
    expected = brute_frame_window(3, 4, 6, 2, 8, video_start, seq)
    assert torch.equal(lay.to_dense()[0, 0], expected)


def test_frame_window_hand_case():
    # 2 frames of 8 tokens, block 4, half width 0: query block 0 (frame 0, positions 0-3) keeps
    # itself and block 2 (frame 1, positions 0-3).
    lay = selection.frame_window((2, 2, 4), keep=0.1, block_size=4, half_width=0)
    assert rows(lay) == [[0, 2], [1, 3], [0, 2], [1, 3]]
    # Default half width: round(keep * 8 / 2) = round(0.5 * 4) = 2 -> neighbours reach across.
    wide = selection.frame_window((2, 2, 4), keep=0.5, block_size=4)
    assert rows(wide) == [[0, 1, 2, 3]] * 4


def test_cogvideox_paper_window_width():
    lay = selection.frame_window((13, 30, 45), keep=0.03125, block_size=128, video_start=226)
    assert lay.seq_q == 226 + 13 * 1350
    # half width 21 at 3.1% like the paper; text rows and columns (block 0, 1) dense
    d = lay.to_dense()[0, 0]
    assert d[0].all() and d[1].all() and d[:, 0].all() and d[:, 1].all()
    assert 0.0 < lay.density() < 0.5


def test_dense_spans_text_first_and_last():
    lay = selection.window(160, keep=0.1, block_size=16)  # one block per row
    first = selection.add_dense_spans(lay, [(0, 20)])  # blocks 0 and 1
    d = first.to_dense()[0, 0]
    assert d[0].all() and d[1].all() and d[:, :2].all()
    assert rows(first)[5] == [0, 1, 5]
    last = selection.window(160, keep=0.1, block_size=16, dense_spans=[(150, 160)])
    assert rows(last)[3] == [3, 9] and rows(last)[9] == list(range(10))


def test_topk_with_dense_spans():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 256, 32, generator=g), torch.randn(1, 2, 256, 32, generator=g)
    lay = selection.topk(q, k, keep=0.125, block_q=32, dense_spans=[(0, 40)])
    d = lay.to_dense()
    assert d[:, :, :2].all() and d[:, :, :, :2].all()
    assert d[:, :, torch.arange(8), torch.arange(8)].all()


@pytest.mark.parametrize("keep", [0, -0.1, 1.5, True, "0.5"])
def test_bad_keep(keep):
    q = torch.zeros(1, 1, 64, 16)
    with pytest.raises(ValueError, match=r"keep must be a fraction in \(0, 1\]"):
        selection.topk(q, q, keep=keep, block_q=16)
    with pytest.raises(ValueError, match="keep must be"):
        selection.window(64, keep=keep, block_size=16)


@pytest.mark.parametrize("block", [0, -16, 2.5])
def test_bad_block_size(block):
    q = torch.zeros(1, 1, 64, 16)
    with pytest.raises(ValueError, match="must be a positive integer"):
        selection.topk(q, q, keep=0.5, block_q=block)
    with pytest.raises(ValueError, match="must be a positive integer"):
        selection.window(64, keep=0.5, block_size=block)
    with pytest.raises(ValueError, match="must be a positive integer"):
        selection.frame_window((2, 2, 2), keep=0.5, block_size=block)


def test_grid_that_does_not_match_sequence():
    with pytest.raises(ValueError, match=r"does not fit a sequence of 100 tokens \(expected seq_len >= 226\)"):
        selection.frame_window((2, 5, 10), keep=0.1, video_start=126, seq_len=100)
    with pytest.raises(ValueError, match=r"grid must be \(frames, height, width\)"):
        selection.frame_window((4, 4), keep=0.1)
    with pytest.raises(ValueError, match="frames must be a positive integer"):
        selection.frame_window((0, 4, 4), keep=0.1)


def test_bad_dense_span():
    lay = selection.window(64, keep=0.5, block_size=16)
    with pytest.raises(ValueError, match=r"0 <= start < end <= 64"):
        selection.add_dense_spans(lay, [(50, 80)])
    with pytest.raises(ValueError, match="token ranges"):
        selection.add_dense_spans(lay, [5])
