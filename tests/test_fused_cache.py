"""The cache step in one Triton pass (rettn.ops._triton_cache) against the two-pass route (the
dense pass with lse, then the statistics of the selected blocks: rettn.ops.reference's
cache_statistics on the sparse pass) and the float64 truth; its route through the chooser
(op "cache": "fused" vs "dense+stats"), the custom op rettn::cache_pass and torch.compile.
The Triton kernel runs under the interpreter (tests/conftest.py)."""

import pytest
import torch
from conftest import DEVICE
from helpers import qkv, random_layout

import rettn
from rettn.ops import _choice as choice
from rettn.ops import selection
from rettn.ops._cache_pass import cache_pass_outputs
from rettn.ops._triton_cache import sweep_order, triton_fused_cache_step
from rettn.ops.attention import cache_step_attention
from rettn.ops.layout import BlockSparseLayout
from rettn.ops.reference import RHO_FLOOR, block_sparse_reference, cache_statistics, masked_attention_reference

BLOCK = 64


def _bshd(b, h, s, d, dtype, seed):
    """(B, S, H, D) buffers seen as (B, H, S, D), as the diffusers processors pass them."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, h, d, generator=g).to(DEVICE, dtype).transpose(1, 2) for _ in range(3)]


def _truth(q, k, v, layout, use_rho=True):
    """float64 (out_dense, lse_dense, rho, R) of the same formula."""
    q64, k64, v64 = (t.double() for t in (q, k, v))
    b, h = q.shape[:2]
    o_s, lse_s = block_sparse_reference(q64, k64, v64, layout.expand(b, h), compute_dtype=torch.float64)
    o_d, lse_d = masked_attention_reference(q64, k64, v64, None, compute_dtype=torch.float64)
    rho = torch.exp(lse_s.double() - lse_d.double()).clamp(RHO_FLOOR, 1.0)
    r = o_d.double() - (rho.unsqueeze(-1) * o_s.double() if use_rho else o_s.double())
    return o_d.double(), lse_d.double(), rho, r


def _two_pass_in_dtype(q, k, v, layout, rdt, use_rho=True):
    """The two-pass route computed in q's dtype (the tolerance baseline)."""
    b, h = q.shape[:2]
    o_s, lse_s = block_sparse_reference(q, k, v, layout.expand(b, h), compute_dtype=q.dtype)
    o_d, lse_d = masked_attention_reference(q, k, v, None, compute_dtype=q.dtype)
    rho, r = cache_statistics(o_d, lse_d, o_s, lse_s, use_rho, rdt)
    return o_d, lse_d, rho, r


def _err(x, truth):
    return (x.double() - truth).abs().max().item()


def _within(result, truth, baseline, floor, what):
    """err(result) <= 2 * err(two passes in the inputs' dtype) + floor, both against fp64."""
    err, base = _err(result, truth), _err(baseline, truth)
    assert err <= 2 * base + floor, f"{what}: error {err:.3g} vs two passes {base:.3g}"


def _layout(kind, b, h, seq, seed):
    if kind == "broadcast":
        return random_layout(1, 1, seq, seq, BLOCK, seed=seed, device=DEVICE)
    if kind == "spans":  # top-k with the text tokens' rows and columns dense (the real layout)
        g = torch.Generator().manual_seed(seed)
        q, k = (torch.randn(b, h, seq, 16, generator=g).to(DEVICE) for _ in range(2))
        return selection.topk(q, k, 0.25, block_q=BLOCK, dense_spans=[(0, 40)])
    return random_layout(b, h, seq, seq, BLOCK, seed=seed, device=DEVICE)


@pytest.mark.parametrize("dtype,rdt", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                       (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("head_dim,seq,kind", [(64, 200, "per-head"), (72, 130, "broadcast"), (64, 300, "spans")])
def test_one_pass_matches_the_two_pass_route(dtype, rdt, head_dim, seq, kind):
    """out_dense, lse, rho and R of the one-pass kernel: as close to the fp64 truth as the two
    passes in the inputs' dtype (strided (B, S, H, D) views, a short tail block, a broadcast
    layout, dense text spans), and close to the public two-pass route itself."""
    b, h = 2, 2
    q, k, v = _bshd(b, h, seq, head_dim, dtype, seed=seq + head_dim)
    layout = _layout(kind, b, h, seq, seed=seq)
    out, rho, res, ok, lse = triton_fused_cache_step(q, k, v, layout, head_dim ** -0.5, residual_dtype=rdt,
                                                     check=True, return_lse=True)
    assert out.dtype == dtype and out.stride() == q.stride() and res.dtype == rdt and res.stride() == q.stride()
    assert rho.shape == lse.shape == (b, h, seq) and rho.dtype == lse.dtype == torch.float32
    assert bool(ok) and float(rho.min()) < 0.9  # really sparse
    o_t, lse_t, rho_t, r_t = _truth(q, k, v, layout)
    o_b, lse_b, rho_b, r_b = _two_pass_in_dtype(q, k, v, layout, rdt)
    floor = 1e-5
    _within(out, o_t, o_b, floor, "out_dense")
    _within(lse, lse_t, lse_b, floor, "lse")
    _within(rho, rho_t, rho_b, floor, "rho")
    _within(res, r_t, r_b, floor, "R")
    # the public route, two passes (backend "torch") against one (backend "triton"): same step
    two = cache_step_attention(q, k, v, layout, residual_dtype=rdt, check_finite=True, backend="torch")
    one = cache_step_attention(q, k, v, layout, residual_dtype=rdt, check_finite=True, backend="triton")
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for name, x, y in zip(("out_dense", "rho", "R"), one[:3], two[:3]):
        torch.testing.assert_close(x.float(), y.float(), atol=tol, rtol=tol, msg=name)
    assert bool(one[3]) and bool(two[3])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_without_rho_without_residual_and_the_finite_flag(dtype):
    """use_rho=False (R = O_dense - O_sparse: the selected blocks swept first), use_residual=False
    (rho only), and the finite check on out_dense."""
    q, k, v = _bshd(1, 2, 150, 64, dtype, seed=5)
    layout = random_layout(1, 2, 150, 150, BLOCK, seed=5, device=DEVICE)
    o_t, _, rho_t, r_t = _truth(q, k, v, layout, use_rho=False)
    o_b, _, rho_b, r_b = _two_pass_in_dtype(q, k, v, layout, dtype, use_rho=False)
    out, rho, res, ok = cache_step_attention(q, k, v, layout, use_rho=False, check_finite=True, backend="triton")
    assert rho is None and bool(ok)
    _within(res, r_t, r_b, 1e-5, "R without rho")
    _within(out, o_t, o_b, 1e-5, "out_dense")
    out, rho, res, ok = cache_step_attention(q, k, v, layout, use_residual=False, backend="triton")
    assert res is None and ok is None
    _within(rho, rho_t, cache_statistics(o_b, _two_pass_in_dtype(q, k, v, layout, None)[1],
                                         *block_sparse_reference(q, k, v, layout, compute_dtype=dtype))[0],
            1e-5, "rho only")
    v = v.clone()
    v[0, 1, 3, 0] = float("nan")  # every output row of head 1 is NaN
    assert not bool(cache_step_attention(q, k, v, layout, check_finite=True, backend="triton")[3])
    big = torch.zeros_like(v)
    big[0, 0, :, 0] = 7e4 if dtype == torch.float16 else 3e38  # out_dense rounds to inf in its dtype
    assert not bool(cache_step_attention(q, k, big, layout, check_finite=True, backend="triton")[3])
    assert bool(cache_step_attention(q, k, v.nan_to_num(), layout, check_finite=True, backend="triton")[3])


@pytest.mark.parametrize("use_rho", [True, False])
def test_selected_share_underflow_gives_the_floor_not_nan(use_rho):
    """Every selected score 400 nats below the row's unselected maximum: the selected share,
    summed against the shared running max, underflows to 0. rho is RHO_FLOOR (what the two passes
    give: their exp(lse_s - lse_d) is below the floor), out_dense and R are finite, and R is
    O_dense - rho * O_sparse to within RHO_FLOOR * |O_sparse| (the documented difference)."""
    s, d = 128, 64
    g = torch.Generator().manual_seed(3)
    q = torch.zeros(1, 1, s, d)
    q[..., 0] = 1.0
    k = 0.01 * torch.randn(1, 1, s, d, generator=g)
    k[:, :, :BLOCK, 0] = -1600.0  # block 0 (selected): scores -1600 / 8 = -200
    k[:, :, BLOCK:, 0] = 1600.0  # block 1 (not selected): +200, so exp(-400) underflows float32
    v = torch.randn(1, 1, s, d, generator=g)
    layout = BlockSparseLayout(torch.ones(1, 1, 2, dtype=torch.int32), torch.zeros(1, 1, 2, 1, dtype=torch.int32),
                               BLOCK, BLOCK, s, s)
    out, rho, res, ok = cache_step_attention(q, k, v, layout, use_rho=use_rho, check_finite=True, backend="triton")
    ref = cache_step_attention(q, k, v, layout, use_rho=use_rho, check_finite=True, backend="torch")
    assert bool(ok) and torch.isfinite(res).all()
    if use_rho:
        assert torch.equal(rho, torch.full_like(rho, RHO_FLOOR)) and torch.equal(ref[1], rho)
    o_s = block_sparse_reference(q.double(), k.double(), v.double(), layout, compute_dtype=torch.float64)[0]
    torch.testing.assert_close(out, ref[0], atol=1e-5, rtol=1e-5)
    bound = (RHO_FLOOR if use_rho else 0.0) * float(o_s.abs().max()) + 1e-5
    assert _err(res, ref[2].double()) <= bound


def test_rows_that_select_every_block_and_unsorted_indices():
    """A layout row that selects every key block: rho = 1 and R = 0 exactly. A layout whose
    indices are not ascending (and repeat one) gives the same result as its sorted form."""
    q, k, v = qkv(1, 2, 192, 64, seed=8)
    mask = torch.rand(1, 2, 3, 3, generator=torch.Generator().manual_seed(8)) < 0.4
    mask[:, :, 0] = True  # query block 0: every key block
    mask[:, :, 1:, 1] = True
    layout = BlockSparseLayout.from_dense(mask, BLOCK, BLOCK, 192, 192)
    out, rho, res, _ = cache_step_attention(q, k, v, layout, backend="triton")
    assert torch.equal(rho[:, :, :BLOCK], torch.ones_like(rho[:, :, :BLOCK]))
    assert torch.equal(res[:, :, :BLOCK], torch.zeros_like(res[:, :, :BLOCK]))
    n, sel = layout.kv_num_blocks, layout.kv_indices
    valid = torch.arange(sel.shape[-1]) < n.unsqueeze(-1)
    desc = torch.sort(torch.where(valid, sel, -1), -1, descending=True).values  # each row's blocks descending
    perm = BlockSparseLayout(n.clone(), desc.clamp(min=0).int().contiguous(), BLOCK, BLOCK, 192, 192)
    assert torch.equal(perm.to_dense(), layout.to_dense()) and not torch.equal(perm.kv_indices, sel)
    again = cache_step_attention(q, k, v, perm, backend="triton")
    for x, y in zip(again[:3], (out, rho, res)):
        assert torch.equal(x, y)


def test_sweep_order_groups_each_row():
    layout = random_layout(2, 1, 300, 300, BLOCK, seed=11)
    mask = layout.to_dense()
    for first in (False, True):
        n, order = sweep_order(layout, first)
        assert order.shape == (2, 1, 5, 5)
        for b in range(2):
            for r in range(5):
                row = order[b, 0, r].tolist()
                group = mask[b, 0, r] if first else ~mask[b, 0, r]
                c = int(n[b, 0, r])
                assert c == int(group.sum()) and sorted(row) == list(range(5))
                assert row[:c] == sorted(row[:c]) and row[c:] == sorted(row[c:])
                assert all(bool(group[i]) for i in row[:c]) and not any(bool(group[i]) for i in row[c:])
        assert sweep_order(layout, first)[1] is order  # kept for the same layout tensors


# ------------------------------------------------------------------ the route: chooser, op, compile
def _timer(times):
    def timer(fns, device):
        return {name: times.get(name, 1.0) for name in fns}
    return timer


@pytest.mark.parametrize("winner", ["fused", "dense+stats"])
def test_auto_times_the_one_pass_kernel_against_dense_plus_stats(winner):
    q, k, v = qkv(1, 2, 128, 32, seed=12)
    layout = random_layout(1, 2, 128, 128, 32, seed=12)
    times = {"fused": 1e-3, "dense+stats": 2e-3} if winner == "fused" else {"fused": 3e-3, "dense+stats": 2e-3}
    ch = choice.BackendChooser(measure=True, timer=_timer(times))
    with choice.use_chooser(ch):
        got = cache_step_attention(q, k, v, layout, check_finite=True)
        want = cache_pass_outputs(q, k, v, layout, 32 ** -0.5, winner, True, q.dtype, True)  # same inner picks
    (record,) = [r for r in ch.choices() if r["op"] == "cache"]
    assert record["candidates"] == ["dense+stats", "fused"] and record["choice"] == winner
    assert record["source"] == "measured" and set(record["timings_ms"]) == {"fused", "dense+stats"}
    for x, y in zip(got, want):
        assert torch.equal(x, y)


def test_cpu_without_measurement_keeps_the_two_pass_route():
    q, k, v = qkv(1, 2, 128, 32, seed=13)
    layout = random_layout(1, 2, 128, 128, 32, seed=13)
    with choice.use_chooser(choice.BackendChooser(measure="cuda")) as ch:
        got = cache_step_attention(q, k, v, layout)
        assert not [r for r in ch.choices() if r["op"] == "cache"]  # not asked: the torch path
    want = cache_pass_outputs(q, k, v, layout, 32 ** -0.5, "dense+stats", True, q.dtype, False)
    for x, y in zip(got[:3], want[:3]):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cache_pass_op_fake_and_schema(backend):
    """torch.library.opcheck on rettn::cache_pass (schema, fake, AOT dispatch), strided inputs."""
    q, k, v = qkv(1, 2, 100, 16, device=DEVICE, seed=40)
    layout = random_layout(1, 2, 100, 100, 32, seed=40, device=DEVICE)
    n, idx = layout.kv_num_blocks, layout.kv_indices
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    for args in [(q, k, v, n, idx, 32, 32, 0.25, backend, True, torch.float16, True),
                 (qt, k, v, n, idx, 32, 32, 0.25, backend, False, torch.float32, False),
                 (q, k, v, n, idx, 32, 32, 0.25, backend, True, None, True)]:
        torch.library.opcheck(torch.ops.rettn.cache_pass.default, args)


def test_cache_step_compiles_as_one_op_without_graph_break():
    torch._dynamo.reset()
    q, k, v = qkv(1, 2, 130, 16, seed=14)
    layout = selection.topk(q, k, 0.5, block_q=32)

    def step(q, k, v, n, idx):
        lay = rettn.BlockSparseLayout(n, idx, 32, 32, 130, 130, validate=False)
        return cache_step_attention(q, k, v, lay, check_finite=True, backend="triton")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v, layout.kv_num_blocks, layout.kv_indices)
    want = step(q, k, v, layout.kv_num_blocks, layout.kv_indices)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    torch._dynamo.reset()
