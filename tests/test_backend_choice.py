"""Backend choice by measurement (rettn.ops._choice), the dense-with-lse kernels, the float32
route on CUDA and the layout memo; on CPU, with injected timings (the timer is the only fake:
every candidate really runs, and results are compared with the chosen backend's own)."""

import json
from types import SimpleNamespace

import pytest
import torch
from helpers import qkv

import rettn
from rettn.ops import attention as att
from rettn.ops import selection
from rettn.ops import _candidates as candidates
from rettn.ops import _choice as choice
from rettn.ops import _dense as dense
from rettn.ops import _dispatch as ops
from rettn.ops import _tiles as tiles
from rettn.ops.layout import BlockSparseLayout, layout_memo, trusted_layout
from rettn.ops.reference import masked_attention_reference

S, D, BLOCK = 128, 32, 32


def fake_timer(times, calls=None):
    """A timer returning ``times[name]`` seconds (unlisted candidates: 1 s)."""
    def timer(fns, device):
        if calls is not None:
            calls.append(sorted(fns))
        for fn in fns.values():
            assert callable(fn)
        return {name: times.get(name, 1.0) for name in fns}
    return timer


def only(*names, grad_ok=True):
    """A candidate set of exactly ``names`` (what the default set would skip, nothing else)."""
    def candidates(op, q, layout, grad, full):
        return [n for n in names if grad_ok or not n.startswith("triton")], {}
    return candidates


def chooser(times, names=None, calls=None, **kw):
    kw.setdefault("measure", True)
    if names is not None:
        kw["candidates"] = only(*names)
    return choice.BackendChooser(timer=fake_timer(times, calls), **kw)


def inputs(seed=0, keep=0.25, b=1, h=2):
    q, k, v = qkv(b, h, S, D, seed=seed)
    return q, k, v, selection.topk(q, k, keep, block_q=BLOCK)


# ------------------------------------------------------------------ the fastest is chosen
@pytest.mark.parametrize("winner", ["torch", "triton:32x32", "triton:32x16"])
def test_fastest_candidate_by_the_timings_is_chosen_and_its_result_returned(winner):
    q, k, v, layout = inputs()
    names = ["torch", "triton:32x32", "triton:32x16"]
    times = {n: (0.001 if n == winner else 0.005) for n in names}
    with choice.use_chooser(chooser(times, names)) as ch:
        out, lse = rettn.block_sparse_attention(q, k, v, layout, return_lse=True)
        (rec,) = ch.choices()
    assert rec["choice"] == winner and rec["source"] == "measured" and rec["op"] == "sparse+lse"
    assert set(rec["timings_ms"]) == set(names) and rec["timings_ms"][winner] == pytest.approx(1.0)
    expected = ops.run(q, k, v, layout, D ** -0.5, winner, True)
    assert torch.equal(out, expected[0]) and torch.equal(lse, expected[1])


def test_default_candidates_include_flex_and_tiles_and_flex_can_win():
    q, k, v, layout = inputs(seed=1)
    calls = []
    with choice.use_chooser(chooser({"flex": 1e-4}, calls=calls)) as ch:
        out = rettn.block_sparse_attention(q, k, v, layout)
        (rec,) = ch.choices()
    assert calls == [sorted(["flex", "torch", "triton:32x32", "triton:32x16"])]
    assert rec["choice"] == "flex" and rec["baseline"] == "torch"
    assert torch.equal(out, rettn.block_sparse_attention(q, k, v, layout, backend="flex"))


def test_a_choice_is_made_once_per_key():
    q, k, v, layout = inputs(seed=2)
    calls = []
    with choice.use_chooser(chooser({"torch": 1e-4}, ["torch", "triton:32x32"], calls)) as ch:
        for _ in range(3):
            rettn.block_sparse_attention(q, k, v, layout)
        new = selection.topk(q * 2, k, 0.25, block_q=BLOCK)  # another selection, same key
        rettn.block_sparse_attention(q, k, v, new)
        assert ch.measurements == 1 and len(calls) == 1
        rettn.block_sparse_attention(q, k, v, layout, return_lse=True)  # another op
        rettn.block_sparse_attention(q.half(), k.half(), v.half(), layout)  # another dtype
        assert ch.measurements == 3
        assert {r["op"] for r in ch.choices()} == {"sparse", "sparse+lse"}


def test_the_key_buckets_density():
    assert choice.density_bucket(1.0) == "full"
    assert choice.density_bucket(0.0625) == choice.density_bucket(0.05) == "(0.0442, 0.0625]"
    assert choice.density_bucket(0.0626) == "(0.0625, 0.0884]"
    assert choice.density_bucket(0.25) == "(0.177, 0.25]"

    q, k, v = qkv(1, 2, 320, D, seed=3)  # 10 key blocks of 32
    a = selection.topk(q, k, 0.2, block_q=BLOCK)  # 2 of 10 blocks per row: density 0.2
    mask = a.to_dense().clone()
    mask[..., 0, :3] = True  # one row with 3 or more blocks: another index width, density ~0.21
    b = BlockSparseLayout.from_dense(mask, BLOCK, BLOCK, 320, 320)
    mask[..., 1::2, :4] = True  # half the rows widened: the next bucket up
    c = BlockSparseLayout.from_dense(mask, BLOCK, BLOCK, 320, 320)
    assert b.max_kv != a.max_kv and a.density() == pytest.approx(0.2)
    assert choice.density_bucket(a.density()) == choice.density_bucket(b.density()) == "(0.177, 0.25]"
    assert choice.density_bucket(c.density()) != choice.density_bucket(a.density())
    with choice.use_chooser(chooser({}, ["torch"])) as ch:
        for lay in (a, b):
            rettn.block_sparse_attention(q, k, v, lay)
        keys = {ch.key("sparse", q, k, lay, False) for lay in (a, b)}
        assert len(keys) == 1  # same bucket: one key
        rettn.block_sparse_attention(q, k, v, c)
        buckets = [r["density_bucket"] for r in ch.choices()]
    assert buckets == [choice.density_bucket(a.density()), choice.density_bucket(c.density())]


# ------------------------------------------------------------------ safety of measurement
def test_failing_and_disagreeing_candidates_are_dropped_with_their_reasons():
    q, k, v, layout = inputs(seed=4)
    # sdpa:cpu computes dense attention: wrong for a layout that skips blocks, and the fastest;
    # triton:64x64 does not divide the 32-token blocks and fails
    names = ["torch", "sdpa:cpu", "triton:64x64", "triton:32x32"]
    times = {"sdpa:cpu": 1e-6, "triton:64x64": 1e-6, "triton:32x32": 1e-3, "torch": 2e-3}
    with choice.use_chooser(chooser(times, names)) as ch:
        out = rettn.block_sparse_attention(q, k, v, layout)
        (rec,) = ch.choices()
    assert rec["choice"] == "triton:32x32"
    assert rec["skipped"]["sdpa:cpu"].startswith("disagrees with torch: output differs")
    assert rec["skipped"]["triton:64x64"].startswith("failed: AssertionError")
    assert set(rec["timings_ms"]) == {"torch", "triton:32x32"}
    assert torch.equal(out, ops.run(q, k, v, layout, D ** -0.5, "triton:32x32", False)[0])


def test_a_dense_kernel_serves_full_layouts_only():
    q, k, v = qkv(1, 2, S, D, seed=5)
    full = BlockSparseLayout.dense(S, S, BLOCK, BLOCK)
    mask = full.to_dense().clone()
    mask[..., 1, 0] = False  # same shape and index width as ``full``, one block skipped
    partial = BlockSparseLayout.from_dense(mask, BLOCK, BLOCK, S, S)
    assert partial.max_kv == full.max_kv and partial.density() < 1
    times = {"sdpa:cpu": 1e-6, "triton:32x32": 1e-3, "torch": 2e-3}
    with choice.use_chooser(chooser(times)) as ch:
        out_full = rettn.block_sparse_attention(q, k, v, full)
        (rec,) = ch.choices()
        assert rec["density_bucket"] == "full" and rec["choice"] == "sdpa:cpu"
        assert rec["fallback"] == "triton:32x32"
        out_partial = rettn.block_sparse_attention(q, k, v, partial)
        assert ch.measurements == 1  # the same key: the signature's bucket is reused
    torch.testing.assert_close(out_full, rettn.attention_with_lse(q, k, v)[0])
    assert torch.equal(out_partial, ops.run(q, k, v, partial, D ** -0.5, "triton:32x32", False)[0])
    assert not torch.allclose(out_partial, out_full, atol=1e-3)


def test_autograd_calls_never_choose_a_kernel_without_backward():
    q, k, v, layout = inputs(seed=6)
    q.requires_grad_(True)
    with choice.use_chooser(chooser({"triton:32x32": 1e-9})) as ch:
        out = rettn.block_sparse_attention(q, k, v, layout)
        (rec,) = ch.choices()
    assert rec["autograd"] is True and rec["skipped"]["triton"] == "no backward (autograd is on)"
    assert rec["choice"] in ("torch", "flex")
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_rescaled_step_and_dense_lse_are_chosen_too():
    q, k, v, layout = inputs(seed=7)
    rho = torch.full((1, 2, S), 0.8)
    residual = 0.1 * torch.randn(1, 2, S, D)
    with choice.use_chooser(chooser({"triton:32x32": 1e-4, "sdpa:cpu": 1e-4})) as ch:
        out = att.sparse_attention_rescaled(q, k, v, layout, rho, residual)
        dense_out, lse = rettn.attention_with_lse(q, k, v)
        recs = {r["op"]: r for r in ch.choices()}
    assert recs["rescaled"]["choice"] == "triton:32x32"
    assert recs["dense+lse"]["choice"] == "sdpa:cpu" and recs["dense+lse"]["blocks"] is None
    plain = ops.run(q, k, v, layout, D ** -0.5, "torch", False)[0]
    torch.testing.assert_close(out, 0.8 * plain + residual, atol=1e-5, rtol=1e-5)
    ref_out, ref_lse = dense.attention("cpu", q, k, v, D ** -0.5)
    assert torch.equal(dense_out, ref_out) and torch.equal(lse, ref_lse)


# ------------------------------------------------------------------ CPU defaults, disk, compile
def test_cpu_auto_stays_the_torch_path_unless_measurement_is_enabled():
    q, k, v, layout = inputs(seed=8)
    quiet = choice.BackendChooser(timer=fake_timer({}))  # measure defaults to "cuda"
    assert quiet.measure == "cuda" and not quiet.measures(q.device)
    with choice.use_chooser(quiet):
        assert att.resolve_backend(None, q, layout) == "torch"
        out = rettn.block_sparse_attention(q, k, v, layout)
        assert quiet.choices() == []  # nothing consulted it
    assert torch.equal(out, rettn.block_sparse_attention(q, k, v, layout, backend="torch"))
    with choice.use_chooser(choice.BackendChooser(measure=True, timer=fake_timer({}))):
        assert att.resolve_backend(None, q, layout) == "auto"
    with choice.use_chooser(choice.BackendChooser(measure=False, timer=fake_timer({}))) as off:
        out = ops.run(q, k, v, layout, D ** -0.5, "auto", False)[0]  # what a CUDA call would do
        (rec,) = off.choices()
        assert rec["source"] == "default" and rec["choice"] == "torch" and "not measured" in rec["note"]


def test_environment_is_read_once_when_the_chooser_is_made(monkeypatch, tmp_path):
    monkeypatch.setenv(choice.ENV_MEASURE, "1")
    monkeypatch.setenv(choice.ENV_CACHE, str(tmp_path / "c.json"))
    ch = choice.BackendChooser()
    assert ch.measure is True and ch.cache_path == tmp_path / "c.json"
    monkeypatch.setenv(choice.ENV_MEASURE, "0")
    assert choice.BackendChooser().measure is False and ch.measure is True
    with pytest.raises(ValueError, match="measure must be 'cuda', True or False"):
        choice.BackendChooser(measure="always")


def test_disk_cache_round_trips(tmp_path):
    path = tmp_path / "sub" / "choices.json"
    q, k, v, layout = inputs(seed=9)
    with choice.use_chooser(chooser({"triton:32x32": 1e-4}, ["torch", "triton:32x32"], cache_path=path)):
        first = rettn.block_sparse_attention(q, k, v, layout)
    data = json.loads(path.read_text())
    assert data["format"] == choice.FILE_FORMAT
    ((key, entry),) = data["entries"].items()
    assert key.startswith("sparse|cpu|float32|1x2x128x128x32|32x32|(0.177, 0.25]|nograd|torch=")
    assert entry["choice"] == "triton:32x32" and set(entry["timings_ms"]) == {"torch", "triton:32x32"}

    def no_timing(fns, device):
        raise AssertionError("a stored choice must not be measured again")

    again = choice.BackendChooser(measure=True, cache_path=path, timer=no_timing,
                                  candidates=only("torch", "triton:32x32"))
    with choice.use_chooser(again):
        second = rettn.block_sparse_attention(q, k, v, layout)
        (rec,) = again.choices()
    assert rec["source"] == "disk" and rec["choice"] == "triton:32x32"
    assert torch.equal(first, second)


def test_a_broken_cache_file_warns_and_is_measured_again(tmp_path):
    path = tmp_path / "choices.json"
    path.write_text("{not json")
    q, k, v, layout = inputs(seed=10)
    with choice.use_chooser(chooser({}, ["torch", "triton:32x32"], cache_path=path)) as ch:
        with pytest.warns(UserWarning, match="ignoring the backend cache"):
            rettn.block_sparse_attention(q, k, v, layout)
        assert ch.choices()[0]["source"] == "measured"
    assert json.loads(path.read_text())["format"] == choice.FILE_FORMAT  # rewritten whole


def test_choice_under_torch_compile_happens_at_run_time_outside_the_graph():
    q, k, v, layout = inputs(seed=11)
    ch = chooser({"triton:32x32": 1e-4}, ["torch", "triton:32x32"])

    def f(q, k, v, n, idx):
        lay = BlockSparseLayout(n, idx, BLOCK, BLOCK, S, S, validate=False)
        return rettn.block_sparse_attention(q, k, v, lay) * 2

    with choice.use_chooser(ch):
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
        out = compiled(q, k, v, layout.kv_num_blocks, layout.kv_indices)
        (rec,) = ch.choices()
    assert rec["choice"] == "triton:32x32" and rec["source"] == "measured"
    assert torch.equal(out, 2 * ops.run(q, k, v, layout, D ** -0.5, "triton:32x32", False)[0])


# ------------------------------------------------------------------ float32 on CUDA, dense kernels
def _cuda_like(dtype, d=64):
    """What the routing code reads of a tensor, for a CUDA tensor on a machine without one."""
    return SimpleNamespace(device=torch.device("cuda"), dtype=dtype, shape=(1, 2, 256, d))


def test_float32_on_cuda_never_reaches_the_triton_kernel():
    layout = BlockSparseLayout.dense(256, 256, 128, 128)
    q32, q16 = _cuda_like(torch.float32), _cuda_like(torch.bfloat16)
    assert candidates.triton_reason(q32, layout) == candidates.FP32_CUDA_REASON
    assert candidates.triton_reason(q16, layout) is None
    names, skipped = candidates.default_candidates("sparse", q32, layout, False, False)
    assert not any(n.startswith("triton") for n in names) and {"torch", "flex"} <= set(names)
    assert skipped["triton"] == candidates.FP32_CUDA_REASON
    assert candidates.default_choice("sparse", q32, names) == "torch"
    names16, _ = candidates.default_candidates("sparse", q16, layout, False, False)
    assert names16[:3] == ["triton:128x64", "triton:64x64", "triton:128x32"]
    assert candidates.default_choice("sparse", q16, names16) == "triton"
    # dense with lse: flash / cuDNN take 16-bit only, the memory-efficient kernel takes fp32
    dnames, dskipped = candidates.default_candidates("dense+lse", q32, None, False, False)
    assert "sdpa:efficient" in dnames and "sdpa:flash" in dskipped and "sdpa:cudnn" in dskipped
    assert candidates.default_choice("dense+lse", q32, dnames) == "sdpa:efficient"
    dnames16, _ = candidates.default_candidates("dense+lse", q16, None, False, False)
    assert {"sdpa:flash", "sdpa:cudnn", "sdpa:efficient"} <= set(dnames16)
    assert candidates.default_choice("dense+lse", q16, dnames16) == "sdpa:flash"
    # asked for by name: a clear error that says what to use instead
    with pytest.raises(ValueError, match="backend='triton' does not run float32 on CUDA.*bfloat16"):
        att.resolve_backend("triton", q32, layout)
    assert att.resolve_backend("triton", q16, layout) == "triton"


def test_tile_options_divide_the_blocks_default_first():
    assert candidates.tile_options(128, 128, 64, "cuda") == [(128, 64), (64, 64), (128, 32)]
    assert candidates.tile_options(64, 64, 64, "cuda") == [(64, 64), (64, 32)]
    assert candidates.tile_options(128, 128, 256, "cuda") == [(64, 32), (32, 32), (64, 64)]
    own = tiles.tile_config((8, 0), 128, torch.bfloat16, 128, 128, "step")  # the kernel's own pick first
    assert candidates.tile_options(128, 128, 128, "cuda", (own.block_m, own.block_n))[0] == (own.block_m, own.block_n)
    assert len(candidates.tile_options(128, 128, 128, "cuda", (128, 32))) == 3
    assert candidates.parse("triton:128x64") == ("triton", (128, 64)) and candidates.parse("torch") == ("torch", None)
    assert candidates.parse("triton") == ("triton", None) and candidates.parse("sdpa:flash") == ("sdpa", "flash")


def test_dense_kernels_are_called_by_their_schema_and_return_lse():
    for name in ("flash", "cudnn", "efficient", "cpu"):
        overload, fixed, lse_at = dense.kernel_op(name)  # this torch has all four, lse second
        assert lse_at == 1 and "scale" not in fixed
    assert dense.kernel_op("cudnn")[1]["compute_log_sumexp"] is True
    assert dense.kernel_op("efficient")[1]["compute_log_sumexp"] is True
    q, k, v = qkv(2, 3, 100, 48, seed=12)
    out, lse = dense.attention("cpu", q.transpose(1, 2).contiguous().transpose(1, 2), k, v, 0.2)
    ref_out, ref_lse = masked_attention_reference(q, k, v, None, 0.2)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    assert lse.shape == (2, 3, 100) and lse.dtype == torch.float32 and lse.is_contiguous()
    assert dense.unsupported_reason("flash", q) == "the flash kernel needs CUDA tensors"
    assert "float16/bfloat16" in dense.unsupported_reason("cudnn", _cuda_like(torch.float32))
    assert "divisible by 8" in dense.unsupported_reason("flash", _cuda_like(torch.float16, d=60))
    assert dense.unsupported_reason("efficient", _cuda_like(torch.float32)) is None


@pytest.mark.parametrize("seq", [77, 1000])
@pytest.mark.parametrize("name", ["flash", "cudnn", "efficient"])
def test_cuda_dense_kernels_bind_and_their_lse_is_cut_to_shape(name, seq):
    # torch's meta kernels give the CUDA ops' real output shapes without a GPU: cuDNN's lse is
    # (B, H, Sq, 1), the efficient kernel's is padded to a multiple of 32 queries
    q = torch.empty(2, 3, seq, 64, dtype=torch.bfloat16, device="meta")
    overload, fixed, lse_at = dense.kernel_op(name)
    raw = overload(q, q, q, **fixed, scale=0.125)[lse_at]
    assert raw.shape == {"flash": (2, 3, seq), "cudnn": (2, 3, seq, 1),
                         "efficient": (2, 3, -(-seq // 32) * 32)}[name]
    out, lse = dense.attention(name, q, q, q, 0.125)
    assert out.shape == q.shape and lse.shape == (2, 3, seq) and lse.dtype == torch.float32
    with pytest.raises(NotImplementedError, match="CPU"):  # the arguments bind: only the device is wrong
        dense.attention(name, *(torch.zeros(1, 1, 8, 64, dtype=torch.bfloat16) for _ in range(3)), 0.125)


def test_unknown_backend_strings_are_an_error_in_the_op():
    q, k, v, layout = inputs(seed=13)
    with pytest.raises(ValueError, match="unknown rettn backend string 'fast'"):
        ops.run(q, k, v, layout, 0.1, "fast", False)


# ------------------------------------------------------------------ the layout memo
def test_a_layout_builds_its_block_mask_once():
    q, k, v, layout = inputs(seed=14, keep=0.5)
    bm = layout.to_block_mask()
    assert layout.to_block_mask() is bm
    # the op rebuilds a layout around the same tensors: it gets the same mask
    again = trusted_layout(layout.kv_num_blocks, layout.kv_indices, BLOCK, BLOCK, S, S)
    assert again.to_block_mask() is bm
    other_blocks = BlockSparseLayout(layout.kv_num_blocks, layout.kv_indices, BLOCK, BLOCK, S - 1, S - 1)
    assert other_blocks.to_block_mask() is not bm
    d = layout.density()
    layout.kv_num_blocks[0, 0, 0] = 1  # changed in place: both are recomputed
    assert layout.to_block_mask() is not bm and layout.density() < d


def test_the_layout_memo_forgets_freed_layouts():
    before = len(layout_memo)
    q, k, v = qkv(1, 1, 256, D, seed=15)
    for i in range(5):
        lay = selection.topk(q + i, k, 0.25, block_q=BLOCK)
        lay.density()
        del lay
    assert len(layout_memo) <= before + 1  # the last one's entry goes with the next lookup
    q2 = selection.topk(q, k, 0.5, block_q=BLOCK)
    q2.density()
    assert len(layout_memo) <= before + 1


def test_trusted_and_checked_layouts_agree():
    _, _, _, layout = inputs(seed=16)
    t = trusted_layout(layout.kv_num_blocks, layout.kv_indices, BLOCK, BLOCK, S, S)
    assert repr(t) == repr(layout) and t.validate is False
    e = layout.expand(1, 2)
    assert e is layout
    e = BlockSparseLayout.dense(S, S, BLOCK, BLOCK).expand(3, 2)
    assert e.kv_num_blocks.shape == (3, 2, S // BLOCK) and torch.equal(e.to_dense()[2, 1], e.to_dense()[0, 0])
    assert layout.to("cpu") is layout


@torch.no_grad()
def test_a_patched_models_stats_show_the_choices_its_calls_made():
    from tiny_models import tiny_inputs, tiny_transformer

    model = tiny_transformer("pixart", qk_gain=8.0)
    with choice.use_chooser(chooser({"torch": 0.001}, ["torch", "triton:32x32"])) as ch:
        handle = rettn.apply_rettention(model, keep=0.25, block_size=32, min_seq_len=0, warmup=0,
                                        refresh_interval=2)
        for t in (900.0, 800.0):  # a cache step, then a sparse step
            model(**tiny_inputs("pixart", model, t=t))
        stats = handle.stats()
        handle.remove()
        ops_seen = {rec["op"] for rec in stats.backend_choices}
        # the cache step's route is op "cache" (here: the injected candidates, torch wins)
        assert stats.backend_choices == ch.choices() and {"cache", "rescaled"} <= ops_seen
        assert all(rec["choice"] == "torch" for rec in stats.backend_choices if rec["op"] != "dense+lse")
