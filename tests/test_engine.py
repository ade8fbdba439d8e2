"""Re-ttention engine invariants (ALGORITHM.md) and RettnConfig validation."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from helpers import qkv

import rettn
from rettn.core.config import RettnConfig, load_preset, preset_names
from rettn.core.engine import CallInfo, Engine, Observer
from rettn.tools.evaluate import AttentionErrorLog


def engine(**kw):
    base = dict(keep=0.25, block_size=32, warmup=0, refresh_interval=3, min_seq_len=0, ramp=0.0)
    base.update(kw)
    return Engine(RettnConfig(**base), n_layers=1, family="test")


def call(eng, t, q, k, v, layer=0):
    eng.on_forward(t)
    return eng.attend(q, k, v, q.shape[-1] ** -0.5, CallInfo(layer=layer, kind="self"))


def test_keep_all_gives_rho_one_residual_zero_and_dense_output():
    q, k, v = qkv(2, 3, 200, 64, seed=1)
    eng = engine(keep=1.0)
    out = call(eng, 900.0, q, k, v)
    dense, _ = rettn.attention_with_lse(q, k, v)
    torch.testing.assert_close(out, dense)
    entry = eng.cache[(0, 0, None)]
    torch.testing.assert_close(entry.rho, torch.ones_like(entry.rho), atol=1e-6, rtol=0)
    assert entry.residual.abs().max() < 1e-5
    # ... and at the following sparse steps too
    for t in (800.0, 700.0):
        torch.testing.assert_close(call(eng, t, q, k, v), dense, atol=1e-5, rtol=1e-5)


def test_sparse_step_on_cache_inputs_reproduces_dense():
    q, k, v = qkv(2, 2, 256, 64, seed=2)
    eng = engine(keep=0.125)
    dense = call(eng, 900.0, q, k, v)  # cache step
    entry = eng.cache[(0, 0, None)]
    assert entry.density < 0.3 and float(entry.rho.min()) < 0.99  # really sparse, rho < 1
    sparse = call(eng, 800.0, q, k, v)  # sparse step, lambda = 0, same inputs
    assert eng.records[-1].kind == "sparse"
    torch.testing.assert_close(sparse, dense, atol=2e-5, rtol=1e-4)
    plain = rettn.block_sparse_attention(q, k, v, entry.layout)
    assert (plain - dense).abs().max() > 1e-2  # without the reshape it would be far off


def test_ramp_adds_lambda_after_each_sparse_step():
    q, k, v = qkv(1, 2, 128, 32, seed=3)
    eng = engine(keep=0.25, ramp=0.04, refresh_interval=10)
    call(eng, 900.0, q, k, v)
    entry = eng.cache[(0, 0, None)]
    o_s = rettn.block_sparse_attention(q, k, v, entry.layout).float()
    rho, res = entry.rho, entry.residual.float()
    for j, t in enumerate((800.0, 700.0, 600.0)):
        out = call(eng, t, q, k, v)
        expected = (rho + 0.04 * j).clamp(max=1.0).unsqueeze(-1) * o_s + res
        torch.testing.assert_close(out.float(), expected, atol=1e-5, rtol=1e-5)


def test_baselines_through_the_same_code():
    q, k, v = qkv(1, 2, 128, 32, seed=4)
    plain = engine(use_rho=False, use_residual=False)
    # cache step: nothing to cache, the dense output (rettn's dense kernel, as the model's SDPA)
    torch.testing.assert_close(call(plain, 900.0, q, k, v), F.scaled_dot_product_attention(q, k, v),
                               atol=1e-5, rtol=1e-5)
    assert plain.stats().dense_backend == "sdpa:cpu"
    layout = plain.cache[(0, 0, None)].layout
    torch.testing.assert_close(call(plain, 800.0, q, k, v), rettn.block_sparse_attention(q, k, v, layout))

    resid = engine(use_rho=False)  # DiTFastAttn: window + residual sharing
    dense = call(resid, 900.0, q, k, v)
    e = resid.cache[(0, 0, None)]
    assert e.rho is None
    o_s = rettn.block_sparse_attention(q, k, v, e.layout)
    torch.testing.assert_close(e.residual, dense - o_s, atol=1e-6, rtol=1e-5)


def test_residual_precision_and_offload():
    q, k, v = qkv(1, 2, 128, 32, seed=5)
    eng = engine(residual_dtype="float16", residual_device="cpu")
    call(eng, 900.0, q, k, v)
    e = eng.cache[(0, 0, None)]
    assert e.residual.dtype == torch.float16 and e.residual.device.type == "cpu"
    assert eng.stats().cached_bytes == 1 * 2 * 128 * 32 * 2 + 1 * 2 * 128 * 4
    assert torch.isfinite(call(eng, 800.0, q, k, v)).all()


def test_budget_error_names_bytes_and_options():
    q, k, v = qkv(1, 2, 128, 32, seed=6)
    eng = Engine(RettnConfig(keep=0.25, block_size=32, warmup=2, min_seq_len=0, max_cache_bytes="1KiB"),
                 n_layers=4, family="test")
    with pytest.raises(MemoryError, match=r"residual_dtype='float16'.*residual_device='cpu'.*skip_layers"):
        call(eng, 900.0, q, k, v)  # raised at step 0, a dense warm-up step, before any caching


def test_layers_shorter_than_min_seq_len_stay_dense():
    q, k, v = qkv(1, 2, 128, 32, seed=7)
    eng = engine(min_seq_len=256)
    assert call(eng, 900.0, q, k, v) is None and not eng.cache


def test_new_generation_resets_state_and_branches_are_separate():
    q, k, v = qkv(1, 2, 128, 32, seed=8)
    eng = engine()
    call(eng, 900.0, q, k, v)
    call(eng, 900.0, q, k, v)  # same timestep: second CFG branch
    assert set(eng.cache) == {(0, 0, None), (0, 1, None)}
    call(eng, 800.0, q, k, v)
    assert eng.tracker.step == 1 and eng.tracker.branch == 0
    call(eng, 999.0, q, k, v)  # timestep went up: a new generation
    assert eng.tracker.step == 0 and eng.tracker.generations == 2
    assert set(eng.cache) == {(0, 0, None)}


# ---------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(keep=0), r"keep must be a fraction in \(0, 1\]"),
        (dict(keep=1.5), r"keep must be a fraction in \(0, 1\]"),
        (dict(warmup=-1), "warmup must be a step count"),
        (dict(dense_final=1.5), "dense_final must be a step count"),
        (dict(refresh_interval=0), "refresh_interval must be"),
        (dict(pattern="diagonal"), r"pattern must be one of \('topk', 'window', 'frame_window'\)"),
        (dict(residual_dtype="int8"), "residual_dtype must be one of"),
        (dict(backend="cuda"), "backend must be one of"),
        (dict(max_cache_bytes="lots"), "max_cache_bytes must be"),
        (dict(skip_layers=[-1]), "skip_layers"),
        (dict(sparse_cross_attention=True, pattern="window"), "needs pattern='topk'"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RettnConfig(**kwargs)


def test_unknown_field_and_preset():
    with pytest.raises(ValueError, match=r"unknown RettnConfig field\(s\) \['sparsity'\]; allowed: \["):
        RettnConfig.from_dict({"sparsity": 0.9})
    with pytest.raises(ValueError, match=r"unknown preset 'cogvideox-9b'; available presets: \["):
        RettnConfig.from_preset("cogvideox-9b")


def test_byte_sizes():
    assert RettnConfig(max_cache_bytes="8GB").max_cache_bytes == 8 * 10**9
    assert RettnConfig(max_cache_bytes="512MiB").max_cache_bytes == 512 * 2**20
    assert RettnConfig(max_cache_bytes=1000).max_cache_bytes == 1000


PAPER = {
    # preset: (steps, dense warm-up, cache steps)
    "pixart-alpha": (20, 5, [5, 10, 15]),
    "pixart-sigma": (20, 5, [5, 10, 15]),
    "hunyuan-dit": (50, 10, list(range(10, 50, 5))),
    "cogvideox-2b": (50, 15, list(range(15, 50, 5))),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_presets_reproduce_the_paper_schedules(name):
    steps, warm, cache = PAPER[name]
    kinds = RettnConfig.from_preset(name).schedule(steps).kinds(steps)
    expected = ["dense"] * warm + ["sparse"] * (steps - warm)
    for c in cache:
        expected[c] = "cache"
    assert kinds == expected
    assert kinds.count("sparse") == {20: 12, 50: 32 if name == "hunyuan-dit" else 28}[steps]


def test_fractional_schedule_scales_to_other_step_counts():
    kinds = RettnConfig.from_preset("cogvideox-2b").schedule(30).kinds(30)
    assert kinds[:9] == ["dense"] * 9 and kinds[9] == "cache" and kinds[12] == "cache"
    assert RettnConfig(warmup=2, refresh_interval=2, dense_final=2).schedule(8).kinds(8) == [
        "dense", "dense", "cache", "sparse", "cache", "sparse", "dense", "dense"]
    with pytest.raises(ValueError, match="needs the number of steps"):
        RettnConfig(warmup=0.3).schedule(None)


def test_every_preset_loads_and_says_whether_it_is_tuned():
    names = preset_names()
    for required in ("cogvideox-2b", "cogvideox-5b", "pixart-alpha", "pixart-sigma", "hunyuan-dit",
                     "wan2.1", "hunyuanvideo", "flux", "ltx-video"):
        assert required in names
    for name in names:
        data = load_preset(name)
        assert isinstance(data["tuned"], bool) and data["notes"]
        RettnConfig.from_preset(name)
    assert not load_preset("flux")["tuned"] and load_preset("cogvideox-2b")["tuned"]


def test_error_log_measures_sparse_step_error():
    q, k, v = qkv(1, 2, 256, 32, seed=9)
    eng = engine(keep=0.125)
    log = eng.observe(AttentionErrorLog(eng))
    call(eng, 900.0, q, k, v)  # cache
    call(eng, 800.0, q, k, v)  # sparse, same inputs: Re-ttention reproduces dense
    q2 = q + 0.3 * torch.randn_like(q)
    call(eng, 700.0, q2, k, v)  # sparse, drifted queries: a real error
    (s1, l1, e1), (s2, _, e2) = log.errors
    assert (s1, l1, s2) == (1, 0, 2)
    assert e1 < 1e-5 < e2 < 1.0


# ---------------------------------------------------------------------------------- fused steps
def _run_steps(backend, q, k, v, **kw):
    eng = engine(keep=0.25, ramp=0.04, refresh_interval=10, backend=backend, **kw)
    outs, rhos = [], []
    for t in (900.0, 800.0, 700.0, 600.0):  # cache, then three sparse steps
        outs.append(call(eng, t, q, k, v))
        rhos.append(eng.cache[(0, 0, None)].rho.clone())
    eng.flush()
    return eng, outs, rhos


@pytest.mark.parametrize("residual_dtype", [None, "float16"])
def test_triton_engine_matches_torch_engine(residual_dtype, monkeypatch):
    """The fused kernels (rho and R in the cache step's sparse pass; clamp, ramp, residual and the
    finite flag in the sparse step's epilogue) give the torch path's results, and never call
    torch.isfinite (the flag comes from the kernel)."""
    q, k, v = qkv(1, 2, 200, 64, seed=20)
    _, ref_outs, ref_rhos = _run_steps("torch", q, k, v, residual_dtype=residual_dtype)

    def no_isfinite(*a, **kw):
        raise AssertionError("torch.isfinite called on the triton path")

    monkeypatch.setattr(torch, "isfinite", no_isfinite)
    eng, outs, rhos = _run_steps("triton", q, k, v, residual_dtype=residual_dtype)
    assert eng.stats().kinds() == ["cache", "sparse", "sparse", "sparse"]
    tol = 2e-5 if residual_dtype is None else 1e-3  # R rounded to fp16 can differ by one fp16 ulp
    for a, b in zip(outs, ref_outs):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    for a, b in zip(rhos, ref_rhos):  # rho_c, rho_c + ramp, rho_c + 2 ramp, ... (unclamped)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rhos[3], rhos[0] + 3 * 0.04, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_at_a_sparse_step_raises_at_the_forwards_end(backend):
    q, k, v = qkv(1, 2, 128, 32, seed=21)
    eng = engine(backend=backend)
    call(eng, 900.0, q, k, v)  # cache
    bad = q.clone()
    bad[0, 1, 100, 5] = float("nan")
    call(eng, 800.0, bad, k, v)  # sparse: no error inside the call
    with pytest.raises(FloatingPointError, match=r"layer\(s\) \[0\] at step 1 \(sparse step"):
        eng.flush()


def test_attention_calls_read_nothing_back_from_the_device(monkeypatch):
    """No device sync inside a cache or sparse step's attention call on the Triton path (top-k
    selection every step included): the statistics, the ramp and the finite flag stay on the
    device until the forward's end (one read in flush). (The torch path reads its block counts
    to size its chunks: a CPU path.)"""
    q, k, v = qkv(1, 2, 128, 32, seed=22)
    eng = engine(backend="triton", reselect="step")
    reads = []
    for name in ("__bool__", "item", "tolist", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _n=name, _r=real: reads.append(_n) or _r(self, *a))
    for t in (900.0, 800.0, 700.0):
        eng.on_forward(t)
        reads.clear()
        eng.attend(q, k, v, 32**-0.5, CallInfo(layer=0, kind="self"))
        assert reads == [], (t, reads)
    eng.flush()


# ---------------------------------------------------------------------------------- observers
class Recorder(Observer):
    def __init__(self):
        self.events = []

    @contextlib.contextmanager
    def region(self, kind, name, device):
        self.events.append(("region", kind, name, device.type))
        yield

    def on_call(self, q, k, v, scale, info):
        self.events.append(("call", q, k, v, scale, info))

    def on_sparse_output(self, q, k, v, scale, info, out):
        self.events.append(("sparse", q, k, v, scale, info, out))


def test_observe_calls_each_hook_with_the_call_and_unobserve_stops_them():
    q, k, v = qkv(1, 2, 256, 32, seed=4)
    eng = engine(keep=0.125)
    rec = Recorder()
    assert eng.observe(rec) is rec and eng.observe(rec) is rec  # twice: registered once
    assert list(eng.observers) == [rec]
    scale = q.shape[-1] ** -0.5
    info = CallInfo(layer=0, kind="self")
    eng.on_forward(900.0)
    eng.attend(q, k, v, scale, info)  # cache step
    calls = [e for e in rec.events if e[0] == "call"]
    assert len(calls) == 1 and calls[0][1] is q and calls[0][2] is k and calls[0][3] is v
    assert calls[0][4] == scale and calls[0][5] is info
    regions = [e[1:] for e in rec.events if e[0] == "region"]
    assert ("cache", "selection", "cpu") in regions and ("cache", "attention", "cpu") in regions
    assert not [e for e in rec.events if e[0] == "sparse"]  # cache steps are not sparse outputs
    rec.events.clear()
    eng.on_forward(800.0)
    out = eng.attend(q, k, v, scale, info)  # sparse step
    kinds = [e[0] for e in rec.events]
    assert kinds[0] == "call" and kinds[-1] == "sparse" and ("region", "sparse", "attention", "cpu") in rec.events
    sparse = rec.events[-1]
    assert sparse[1] is q and sparse[4] == scale and sparse[5] is info and sparse[6] is out
    eng.unobserve(rec)
    eng.unobserve(rec)  # not registered any more: nothing happens
    rec.events.clear()
    eng.on_forward(700.0)
    eng.attend(q, k, v, scale, info)
    assert rec.events == [] and len(eng.observers) == 0


def test_on_call_sees_dense_steps_and_skipped_layers_too():
    q, k, v = qkv(1, 1, 64, 16, seed=5)
    eng = engine(warmup=1, skip_layers=[1])
    rec = eng.observe(Recorder())
    dense = call(eng, 900.0, q, k, v)  # dense warm-up step: rettn's dense kernel
    torch.testing.assert_close(dense, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    assert call(eng, 800.0, q, k, v, layer=1) is None  # skipped layer: the model's own attention
    # the dense step's attention is rettn's now, timed as its "attention" region
    assert [e[0] for e in rec.events] == ["call", "region", "call"]
    assert rec.events[1] == ("region", "dense", "attention", "cpu")


def test_region_is_a_no_op_without_region_observers():
    eng = engine()
    dev = torch.device("cpu")
    assert isinstance(eng.region("attention", dev), contextlib.nullcontext)

    class Calls(Observer):  # overrides only on_call: region stays the fast path
        def on_call(self, *args):
            pass

    eng.observe(Calls())
    assert eng.observers.regions == () and isinstance(eng.region("attention", dev), contextlib.nullcontext)
    a, b = eng.observe(Recorder()), eng.observe(Recorder())
    with eng.region("selection", dev):  # both regions, nested
        pass
    assert a.events == b.events == [("region", "dense", "selection", "cpu")]
    with pytest.raises(TypeError, match="observer must be a rettn.core.observers.Observer"):
        eng.observe(object())


def test_tools_observe_the_engine_without_setting_its_attributes():
    from rettn.tools.profile.clocks import StepRegionTimer
    from rettn.tools.profile.runners import Capture

    q, k, v = qkv(1, 2, 256, 32, seed=6)
    eng = engine(keep=0.125)
    before = set(vars(eng))
    timer, capture, log = StepRegionTimer(), Capture(), AttentionErrorLog(eng)
    for observer in (timer, capture, log):
        eng.observe(observer)
    for t in (900.0, 800.0):
        call(eng, t, q, k, v)
    assert set(vars(eng)) == before  # no attribute set (nor a replaced eng.attend)
    assert not hasattr(eng, "timer") and not hasattr(eng, "error_log") and "attend" not in vars(eng)
    assert capture.shape == tuple(q.shape) and capture.scale == q.shape[-1] ** -0.5
    assert {kind for kind, _ in timer.totals()} == {"cache", "sparse"}
    assert [(s, layer) for s, layer, _ in log.errors] == [(1, 0)]


def test_a_bare_engine_refuses_a_mask_in_one_line():
    from rettn.errors import UnsupportedError

    eng = Engine(RettnConfig(min_seq_len=0), n_layers=1, family="test")
    q, k, v = qkv(1, 1, 64, 16)
    eng.on_forward(900.0)
    with pytest.raises(UnsupportedError, match="only through apply_rettention"):
        eng.attend(q, k, v, 0.25, CallInfo(layer=0), mask=torch.ones(1, 1, 64, 64, dtype=torch.bool))
