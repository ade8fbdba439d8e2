"""Block selection: exact indices on hand-made cases, density, dense spans, bad arguments."""

import math

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import rettn
from rettn.ops import selection
from helpers import random_layout


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


# ---------------------------------------------------------------------------------------------
# The selection before issue 19 (pad + float copy, sort-based dense_to_kv), kept as the reference
# the sync-free version must reproduce: same counts and the same selected blocks in every row.
def _old_sizes(seq, block):
    n = -(-seq // block)
    sizes = torch.full((n,), block, dtype=torch.int64)
    sizes[-1] = seq - (n - 1) * block
    return sizes


def _old_pool(x, block):
    b, h, s, d = x.shape
    n = -(-s // block)
    x = x.float()
    if n * block - s:
        x = F.pad(x, (0, 0, 0, n * block - s))
    sums = x.reshape(b, h, n, block, d).sum(3)
    return sums / _old_sizes(s, block).to(sums.dtype).view(1, 1, n, 1)


def _old_dense_to_kv(mask, width=None):
    counts = mask.sum(-1, dtype=torch.int32)
    order = torch.sort(mask.to(torch.uint8), dim=-1, descending=True, stable=True).indices
    width = width or max(int(counts.max()), 1)
    return counts, order[..., :width].to(torch.int32)


def _old_spans(layout_mask, seq_q, seq_k, bq, bk, spans=(), key_spans=()):
    mask = layout_mask.clone()
    for s, e in key_spans:
        mask[..., s // bk : (e - 1) // bk + 1] = True
    for s, e in spans:
        mask[:, :, s // bq : (e - 1) // bq + 1] = True
        mask[..., s // bk : (e - 1) // bk + 1] = True
    return _old_dense_to_kv(mask, mask.shape[-1])


def _old_scores(q, k, bq, bk):
    scores = torch.matmul(_old_pool(q, bq), _old_pool(k, bk).transpose(-1, -2)) * q.shape[-1] ** -0.5
    if q.shape[2] == k.shape[2]:
        diag = selection.diagonal_blocks(q.shape[2], bq, bk)
        scores[:, :, torch.arange(len(diag)), diag] = float("inf")
    return scores


def old_topk(q, k, keep, bq, bk, spans=(), key_spans=()):
    scores = _old_scores(q, k, bq, bk)
    n = max(1, min(scores.shape[-1], math.ceil(keep * scores.shape[-1] - 1e-9)))
    idx = torch.sort(scores.topk(n, dim=-1).indices, dim=-1).values.to(torch.int32)
    if not spans and not key_spans:
        return torch.full(idx.shape[:3], n, dtype=torch.int32), idx
    mask = torch.zeros(scores.shape, dtype=torch.bool).scatter_(-1, idx.long(), True)
    return _old_spans(mask, q.shape[2], k.shape[2], bq, bk, spans, key_spans)


def old_topk_mass(q, k, mass, bq, bk, max_keep, spans=()):
    scores = torch.matmul(_old_pool(q, bq), _old_pool(k, bk).transpose(-1, -2)) * q.shape[-1] ** -0.5
    nk = scores.shape[-1]
    scores = scores + _old_sizes(k.shape[2], bk).float().log()
    probs, order = torch.softmax(scores, dim=-1).sort(dim=-1, descending=True)
    take = (probs.cumsum(-1) - probs < mass) & (torch.arange(nk) < max(1, math.ceil(max_keep * nk - 1e-9)))
    take[..., 0] = True
    mask = torch.zeros_like(take).scatter_(-1, order, take)
    if q.shape[2] == k.shape[2]:
        diag = selection.diagonal_blocks(q.shape[2], bq, bk)
        mask[:, :, torch.arange(len(diag)), diag] = True
    if spans:
        return _old_spans(mask, q.shape[2], k.shape[2], bq, bk, spans)
    return _old_dense_to_kv(mask)


def assert_same_layout(lay, counts, indices):
    """Same counts, same selected blocks per row, and every counted prefix strictly increasing
    (distinct, ascending: what the kernels rely on)."""
    assert lay.kv_num_blocks.dtype == torch.int32 and lay.kv_indices.dtype == torch.int32
    assert torch.equal(lay.kv_num_blocks, counts)
    valid = torch.arange(lay.max_kv) < lay.kv_num_blocks.unsqueeze(-1)
    prefix = torch.where(valid, lay.kv_indices, lay.num_k_blocks + torch.arange(lay.max_kv))
    assert (prefix.diff(dim=-1) > 0).all()
    old = rettn.BlockSparseLayout(counts, indices.contiguous(), lay.block_q, lay.block_k, lay.seq_q, lay.seq_k)
    assert torch.equal(lay.to_dense(), old.to_dense())
    if indices.shape == lay.kv_indices.shape:  # same width: the same tensors, padding included
        assert torch.equal(lay.kv_indices, indices)


CASES = [  # seq_q, seq_k, block_q, block_k, spans, key_spans
    (1000, 1000, 64, 64, (), ()),
    (1000, 1000, 64, 64, [(0, 100)], ()),
    (1000, 1000, 64, 32, [(950, 1000)], ()),
    (777, 777, 32, 64, [(0, 40), (500, 530)], ()),
    (640, 640, 64, 64, [(0, 64)], [(600, 640)]),
    (256, 777, 64, 64, (), [(0, 77)]),
    (300, 520, 32, 64, (), [(0, 20), (500, 520)]),
    (520, 300, 64, 16, (), ()),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("strided", [False, True])
def test_topk_matches_previous_selection(case, dtype, strided):
    seq_q, seq_k, bq, bk, spans, key_spans = case
    g = torch.Generator().manual_seed(seq_q + seq_k + bq)
    if strided:  # (B, S, H, D) tensors seen as (B, H, S, D), as attention processors pass them
        q = torch.randn(2, seq_q, 3, 32, generator=g).to(dtype).transpose(1, 2)
        k = torch.randn(2, seq_k, 3, 32, generator=g).to(dtype).transpose(1, 2)
    else:
        q, k = torch.randn(2, 3, seq_q, 32, generator=g).to(dtype), torch.randn(2, 3, seq_k, 32, generator=g).to(dtype)
    for keep in (0.03125, 0.2, 1.0):
        lay = selection.topk(q, k, keep, block_q=bq, block_k=bk, dense_spans=spans, dense_key_spans=key_spans)
        assert_same_layout(lay, *old_topk(q, k, keep, bq, bk, spans, key_spans))


@pytest.mark.parametrize("case", CASES)
def test_topk_mass_matches_previous_selection(case):
    seq_q, seq_k, bq, bk, spans, _ = case
    g = torch.Generator().manual_seed(7)
    q, k = 3 * torch.randn(1, 2, seq_q, 16, generator=g), 3 * torch.randn(1, 2, seq_k, 16, generator=g)
    for mass, max_keep in ((0.5, 1.0), (0.9, 0.25), (1.0, 1.0)):
        lay = selection.topk_mass(q, k, mass, block_q=bq, block_k=bk, max_keep=max_keep, dense_spans=spans)
        assert_same_layout(lay, *old_topk_mass(q, k, mass, bq, bk, max_keep, spans))


def test_add_spans_match_previous_on_any_layout():
    lay = random_layout(2, 2, 500, 500, 32, density=0.2, seed=4)
    mask = lay.to_dense()
    for spans in ([(0, 10)], [(490, 500)], [(0, 33), (200, 260)]):
        assert_same_layout(selection.add_dense_spans(lay, spans), *_old_spans(mask, 500, 500, 32, 32, spans))
        assert_same_layout(selection.add_dense_key_spans(lay, spans),
                           *_old_spans(mask, 500, 500, 32, 32, (), spans))


@pytest.mark.parametrize("shape", [(2, 3, 17, 40), (1, 1, 1, 1), (1, 2, 5, 7)])
def test_dense_to_kv_is_the_stable_sort(shape):
    from rettn.ops.layout import dense_to_kv

    g = torch.Generator().manual_seed(0)
    for p in (0.0, 0.2, 1.0):
        mask = torch.rand(*shape, generator=g) < p
        counts, idx = dense_to_kv(mask, width=shape[-1])
        old_counts, old_idx = _old_dense_to_kv(mask, shape[-1])
        assert torch.equal(counts, old_counts) and torch.equal(idx, old_idx)
        assert dense_to_kv(mask)[1].shape[-1] == max(int(old_counts.max()), 1)


def test_pool_blocks_on_strided_low_precision_input():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 70, 3, 8, generator=g).to(torch.bfloat16).transpose(1, 2)  # (B, H, S, D) view
    pooled = selection.pool_blocks(x, 16)  # 4 full blocks and a tail of 6
    assert pooled.dtype == torch.float32 and pooled.shape == (2, 3, 5, 8)
    torch.testing.assert_close(pooled, _old_pool(x, 16), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pooled[:, :, 4], x[:, :, 64:].float().mean(2))


class _Recorder(TorchDispatchMode):
    """Every aten op run, with the devices of its tensor arguments and the size of its largest
    new output (0 for views, which copy nothing)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat_in = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        flat_out = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.ops.append((func.overloadpacket.__name__, {t.device.type for t in flat_in},
                         0 if func.is_view else max((t.numel() for t in flat_out), default=0)))
        return out


SYNCING = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal"}


def _record(fn, *args, **kwargs):
    with _Recorder() as rec:
        fn(*args, **kwargs)
    return rec.ops


@pytest.mark.parametrize("spans, key_spans", [((), ()), ([(0, 226)], ()), ([(0, 100)], [(900, 1000)])])
def test_topk_has_no_sync_and_no_full_size_copy(spans, key_spans):
    # bf16 q and k with a tail block, strided like an attention processor's (B, S, H, D) views
    q = torch.randn(1, 1000, 2, 64).to(torch.bfloat16).transpose(1, 2)
    k = torch.randn(1, 1000, 2, 64).to(torch.bfloat16).transpose(1, 2)
    for _ in range(2):  # the first call builds the cached constants, the second reuses them
        ops = _record(selection.topk, q, k, 0.03125, block_q=128, dense_spans=spans, dense_key_spans=key_spans)
        assert not SYNCING & {name for name, _, _ in ops}
        assert max(size for _, _, size in ops) < q.numel() // 8, ops  # no copy, pad or cast of q or k
    assert "arange" not in {name for name, _, _ in ops}  # constants came from the cache
    mass = _record(selection.topk_mass, q, k, 0.9, block_q=128, dense_spans=spans)
    assert not SYNCING & {name for name, _, _ in mass}
    density = _record(selection.topk(q, k, 0.1, block_q=128, dense_spans=spans).density_tensor)
    assert not SYNCING & {name for name, _, _ in density}


def test_topk_makes_no_host_to_device_copy():
    # On the meta device any host tensor (a Python list made a tensor, a scalar written into a
    # tensor) shows up as a CPU argument of some op: on CUDA it would be a copy that syncs.
    q, k = torch.empty(2, 3, 1000, 64, device="meta"), torch.empty(2, 3, 1000, 64, device="meta")
    for fn, kwargs in ((selection.topk, dict(keep=0.1, dense_spans=[(0, 226)], dense_key_spans=[(900, 1000)])),
                       (selection.topk, dict(keep=0.1)),
                       (selection.topk_mass, dict(mass=0.9, dense_spans=[(0, 226)]))):
        ops = _record(fn, q, k, block_q=128, **kwargs)
        assert all(devices <= {"meta"} for _, devices, _ in ops), [op for op in ops if op[1] - {"meta"}]
    lay = selection.topk(q, k, 0.1, block_q=128, dense_spans=[(0, 226)])
    assert lay.kv_indices.shape == (2, 3, 8, 8) and lay.kv_indices.device.type == "meta"
    ops = _record(lay.density_tensor)
    assert all(devices <= {"meta"} for _, devices, _ in ops)


def test_cached_constants_are_not_shared_across_shapes():
    g = torch.Generator().manual_seed(5)
    for seq in (300, 310, 300):  # the cache is keyed by shape: each call matches the reference
        q, k = torch.randn(1, 2, seq, 16, generator=g), torch.randn(1, 2, seq, 16, generator=g)
        for spans in ([(0, 40)], [(250, 300)]):
            lay = selection.topk(q, k, 0.1, block_q=32, dense_spans=spans)
            assert_same_layout(lay, *old_topk(q, k, 0.1, 32, 32, spans))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_topk_in_a_cuda_graph():
    """No synchronising call; captured once, replayed on new q and k: the same layout as eager
    selection."""
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k = (torch.randn(2, 4, 2000, 64, generator=g).cuda().to(torch.bfloat16) for _ in range(2))
    spans = [(0, 226)]
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (and fill the constant cache) off the capture
        selection.topk(q, k, 0.0625, block_q=128, dense_spans=spans)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a synchronising call raises
    try:
        selection.topk(q, k, 0.0625, block_q=128, dense_spans=spans, dense_key_spans=[(1900, 2000)])
        selection.topk_mass(q, k, 0.9, block_q=128, dense_spans=spans).density_tensor()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lay = selection.topk(q, k, 0.0625, block_q=128, dense_spans=spans)
    for seed in (1, 2):
        g.manual_seed(seed)
        q.copy_(torch.randn(q.shape, generator=g).to(q))
        k.copy_(torch.randn(k.shape, generator=g).to(k))
        graph.replay()
        eager = selection.topk(q, k, 0.0625, block_q=128, dense_spans=spans)
        assert torch.equal(lay.kv_num_blocks, eager.kv_num_blocks)
        assert torch.equal(lay.kv_indices, eager.kv_indices)


def test_selection_compiles_without_graph_break():
    q, k = torch.randn(1, 2, 300, 16), torch.randn(1, 2, 300, 16)

    def f(q, k):
        a = selection.topk(q, k, 0.1, block_q=32, dense_spans=[(0, 40)], dense_key_spans=[(280, 300)])
        b = selection.topk_mass(q, k, 0.8, block_q=32, max_keep=0.5)
        return a.kv_num_blocks, a.kv_indices, b.kv_num_blocks, b.kv_indices, a.density_tensor()

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k)
    for c, e in zip(compiled, f(q, k)):
        assert torch.equal(c, e)


def test_bench_selection_script_runs(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_selection.py"
    spec = importlib.util.spec_from_file_location("bench_selection", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "sel.json"
    result = bench.main(["--device", "cpu", "--batch", "1", "--heads", "2", "--seq", "700", "--text-len", "50",
                         "--repeats", "1", "--inner", "1", "--json", str(out)])
    assert result["eager_ms"] > 0 and result["max_kv"] == 6  # 6 key blocks, text dense: full width
    assert json.loads(out.read_text())["seq"] == 700
