"""Numerical and state safety: fp16 scores beyond fp16's range, selected blocks that are nearly
all padding, NaN / inf inputs (an error naming the layers, never a silent NaN video), fp16
residual overflow, and two patched pipelines in one process (interleaved and in two threads).

The kernel tests run on ``conftest.DEVICE``: CUDA where there is one (the Triton backend needs
CUDA tensors there), else CPU with the Triton interpreter."""

import threading

import pytest
import torch
from helpers import qkv
from tiny_models import tiny_inputs, tiny_pipeline, tiny_pipeline_kwargs, tiny_transformer

import rettn
from conftest import DEVICE
from rettn.core.config import RettnConfig
from rettn.core.engine import CallInfo, Engine
from rettn.ops.reference import masked_attention_reference

BACKENDS = ["torch", "triton", "flex"]


def _truth(q, k, v, layout=None, scale=None):
    from rettn.ops.reference import layout_token_mask

    mask = None if layout is None else layout_token_mask(layout)
    return masked_attention_reference(q.double(), k.double(), v.double(), mask, scale, compute_dtype=torch.float64)


def check_fp16_scores_beyond_fp16_range(backend, device, block=32, seq=160):
    """q = k with |q|^2 = 1600 * 64 = 102,400 > 65,504: a score computed in fp16 overflows. The
    kernels accumulate in fp32: finite, and as close to the fp64 truth as fp16 outputs allow.
    (Also run by the GPU tier, tests/test_gpu.py, at the GPU's block size.)"""
    q, _, v = qkv(1, 2, seq, 64, dtype=torch.float16, device=device, seed=4)
    q = (q.float() * 40).half()
    k = q.clone()
    assert float((q[0, 0, 0].float() ** 2).sum()) > 65504
    layout = rettn.ops.selection.topk(q, k, 0.5, block_q=block)
    out, lse = rettn.block_sparse_attention(q, k, v, layout, return_lse=True, backend=backend)
    true_out, true_lse = _truth(q, k, v, layout)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert (out.double() - true_out).abs().max() < 1e-2
    assert ((lse.double() - true_lse).abs() / true_lse.abs()).max() < 1e-3
    dense, dense_lse = rettn.attention_with_lse(q, k, v)
    true_dense, _ = _truth(q, k, v)
    assert torch.isfinite(dense).all() and (dense.double() - true_dense).abs().max() < 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_scores_beyond_fp16_range(backend):
    check_fp16_scores_beyond_fp16_range(backend, DEVICE)


def test_engine_fp16_overflowing_scores_stay_finite():
    q, _, v = qkv(1, 2, 160, 64, dtype=torch.float16, seed=5)
    q = (q.float() * 40).half()
    k = q.clone()
    eng = Engine(RettnConfig(keep=0.25, block_size=32, warmup=0, refresh_interval=3, min_seq_len=0),
                 n_layers=1, family="test")
    for t in (900.0, 800.0, 700.0):  # cache, sparse, sparse
        eng.on_forward(t)
        out = eng.attend(q, k, v, 64**-0.5, CallInfo(layer=0))
        assert torch.isfinite(out).all()
    eng.flush()  # the finite check passes
    rho = eng.cache[(0, 0, None)].rho
    assert torch.isfinite(rho).all() and float(rho.max()) <= 1.0 + 0.04 * 2


def check_rows_whose_selected_block_is_nearly_all_padding(backend, device, block=64, dtype=torch.float32):
    """seq = 2 blocks + 1 token: every query block keeps only the last key block, which holds one
    real key and block - 1 padding slots. The padding must not count: every output row is exactly
    that key's value, and lse = its score. (Also run by the GPU tier at the GPU's block size.)"""
    seq = 2 * block + 1
    q, k, v = qkv(1, 2, seq, 32 if dtype == torch.float32 else 64, dtype=dtype, device=device, seed=6)
    n = torch.ones(1, 1, 3, dtype=torch.int32, device=device)
    idx = torch.full((1, 1, 3, 1), 2, dtype=torch.int32, device=device)
    layout = rettn.BlockSparseLayout(n, idx, block, block, seq, seq)
    out, lse = rettn.block_sparse_attention(q, k, v, layout, return_lse=True, backend=backend)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out, v[:, :, seq - 1:seq].expand_as(out), atol=tol, rtol=tol)
    score = (q.float() @ k[:, :, seq - 1].float().unsqueeze(-1)).squeeze(-1) * q.shape[-1] ** -0.5
    torch.testing.assert_close(lse, score, atol=1e-4 if dtype == torch.float32 else 1e-2, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_whose_selected_block_is_nearly_all_padding(backend):
    check_rows_whose_selected_block_is_nearly_all_padding(backend, DEVICE)


def test_a_row_with_no_block_is_an_error_not_nan():
    n = torch.tensor([[[1, 0]]], dtype=torch.int32)
    idx = torch.zeros(1, 1, 2, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="attends no key block"):
        rettn.BlockSparseLayout(n, idx, 64, 64, 128, 128)


def _patched_transformer(**overrides):
    model = tiny_transformer("cogvideox", 0, qk_gain=8.0)
    config = dict(keep=0.25, block_size=32, warmup=0, refresh_interval=2, min_seq_len=0, num_inference_steps=4)
    config.update(overrides)
    return model, rettn.apply_rettention(model, **config)


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_nan_or_inf_inputs_raise_naming_layers_and_step(poison):
    model, handle = _patched_transformer()
    inputs = tiny_inputs("cogvideox", model, batch=1)
    with torch.no_grad():
        assert torch.isfinite(model(**inputs)[0]).all()  # step 0: a cache step, finite
        bad = dict(inputs, timestep=inputs["timestep"] * 0 + 400)
        bad["hidden_states"] = inputs["hidden_states"].clone()
        bad["hidden_states"][0, 0, 0, 0, 0] = poison
        with pytest.raises(FloatingPointError, match=r"layer\(s\) \[0, 1\] at step 1 \(sparse step") as e:
            model(**bad)
    assert "check_finite=False" in str(e.value)
    handle.remove()


def test_check_finite_off_lets_the_nan_through():
    model, handle = _patched_transformer(check_finite=False)
    inputs = tiny_inputs("cogvideox", model, batch=1)
    inputs["hidden_states"][0, 0, 0, 0, 0] = float("nan")
    with torch.no_grad():
        assert torch.isnan(model(**inputs)[0]).any()
    handle.remove()


def test_fp16_residual_overflow_is_named():
    """fp32 attention whose outputs exceed fp16's range, cached with residual_dtype='float16':
    the sparse step would be inf; the error says so and names the remedy."""
    q, k, v = qkv(1, 2, 128, 32, seed=7)
    v = v * 1e6
    eng = Engine(RettnConfig(keep=0.25, block_size=32, warmup=0, refresh_interval=3, min_seq_len=0,
                             residual_dtype="float16"), n_layers=1, family="test")
    for t in (900.0, 800.0):
        eng.on_forward(t)
        eng.attend(q, k, v, 32**-0.5, CallInfo(layer=0))
    with pytest.raises(FloatingPointError, match="residual_dtype='float16'"):
        eng.flush()


def _pipe_and_kwargs(family, **config):
    pipe = tiny_pipeline(family, qk_gain=8.0)
    handle = rettn.apply_rettention(pipe, keep=0.25, block_size=32, warmup=1, refresh_interval=2,
                                    min_seq_len=0, **config)
    return pipe, handle, lambda **kw: tiny_pipeline_kwargs(family, num_inference_steps=5, output_type="latent", **kw)


def test_two_patched_pipelines_keep_separate_state():
    """A second pipeline's whole generation runs inside the first one's step callback: each keeps
    its own statistics, schedule and output, as when run alone."""
    pipe_a, handle_a, kw_a = _pipe_and_kwargs("cogvideox")
    pipe_b, handle_b, kw_b = _pipe_and_kwargs("pixart", ramp=0.0)
    alone_a, alone_b = pipe_a(**kw_a()).frames, pipe_b(**kw_b()).images
    def table(stats):  # the step table (the sparse-vs-dense cost lines are device measurements, kept across runs)
        return [line for line in str(stats).splitlines() if not line.startswith("sparse vs dense:")]

    stats_b = table(handle_b.stats())
    inner = {}

    def run_b_inside(pipe, step, timestep, callback_kwargs):
        if step == 2:
            inner["b"] = pipe_b(**kw_b()).images
        return callback_kwargs

    nested_a = pipe_a(**kw_a(callback_on_step_end=run_b_inside)).frames
    assert torch.equal(nested_a, alone_a)
    assert torch.equal(inner["b"], alone_b)
    assert handle_a.stats().kinds() == ["dense", "cache", "sparse", "cache", "sparse"]
    assert table(handle_b.stats()) == stats_b
    assert handle_a.stats().generations == 2 and handle_b.stats().generations == 2
    handle_a.remove()
    handle_b.remove()


def test_two_patched_pipelines_in_two_threads():
    pipe_a, handle_a, kw_a = _pipe_and_kwargs("cogvideox")
    pipe_b, handle_b, kw_b = _pipe_and_kwargs("pixart")
    alone_a, alone_b = pipe_a(**kw_a()).frames, pipe_b(**kw_b()).images
    results, errors = {}, []

    def run(name, fn):
        try:
            for i in range(2):
                results[(name, i)] = fn()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=("a", lambda: pipe_a(**kw_a()).frames)),
               threading.Thread(target=run, args=("b", lambda: pipe_b(**kw_b()).images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(2):
        assert torch.equal(results[("a", i)], alone_a)
        assert torch.equal(results[("b", i)], alone_b)
    handle_a.remove()
    handle_b.remove()


@pytest.mark.parametrize("field,value,match", [
    ("ramp", float("nan"), "ramp .* finite number >= 0, got nan"),
    ("ramp", float("inf"), "ramp .* finite number >= 0, got inf"),
    ("warmup", float("nan"), "warmup must be a step count"),
    ("refresh_interval", float("inf"), "refresh_interval must be a step count"),
    ("keep", float("nan"), "keep must be a fraction"),
    ("check_finite", 1, "check_finite must be True or False"),
])
def test_config_rejects_non_finite_numbers(field, value, match):
    with pytest.raises(ValueError, match=match):
        RettnConfig(**{field: value})


def test_config_accepts_numpy_numbers_as_python_ones():
    np = pytest.importorskip("numpy")
    c = RettnConfig(block_size=np.int64(64), warmup=np.int64(2), refresh_interval=np.float64(0.25),
                    skip_layers=[np.int64(1)], num_inference_steps=np.int32(20))
    assert (c.block_size, c.warmup, c.refresh_interval, c.skip_layers, c.num_inference_steps) == (64, 2, 0.25, [1], 20)
    assert type(c.block_size) is int and type(c.warmup) is int and type(c.refresh_interval) is float
    assert c.schedule(20).kinds(20)[:3] == ["dense", "dense", "cache"]
