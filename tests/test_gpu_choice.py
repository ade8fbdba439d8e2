"""GPU tier: backend choice by measurement on CUDA, the dense-with-lse kernels (flash, cuDNN,
memory-efficient) and the float32 route."""

import pytest
import torch
from helpers import assert_close_to_truth, qkv

import rettn
from rettn.ops import attention as att
from rettn.ops import selection
from rettn.ops import _candidates as candidates
from rettn.ops import _choice as choice
from rettn.ops import _dense as dense

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_auto_on_cuda_measures_and_is_never_slower_than_flex():
    q, k, v = qkv(2, 8, 2048, 64, torch.bfloat16, "cuda", seed=1)
    layout = selection.topk(q, k, keep=0.0625, block_q=128, dense_spans=[(0, 226)])
    with choice.use_chooser(choice.BackendChooser(cache_path=None)) as ch:
        out = rettn.block_sparse_attention(q, k, v, layout)
        (rec,) = ch.choices()
    assert rec["source"] == "measured" and rec["op"] == "sparse"
    assert any(n.startswith("triton:") for n in rec["timings_ms"]), rec
    assert "flex" in rec["timings_ms"], rec
    assert rec["timings_ms"][rec["choice"]] <= rec["timings_ms"]["flex"]
    assert_close_to_truth(out, None, q, k, v, layout, floor=1e-3)


@pytest.mark.parametrize("name", ["flash", "cudnn", "efficient"])
def test_dense_kernels_return_the_natural_lse(name):
    q, k, v = qkv(2, 3, 1000, 64, torch.bfloat16, "cuda", seed=2)
    try:
        out, lse = dense.attention(name, q, k, v, 64 ** -0.5)
    except RuntimeError as e:  # cuDNN may not take this shape on every driver: say so
        pytest.skip(f"{name} refused: {e}")
    assert lse.shape == (2, 3, 1000) and lse.dtype == torch.float32 and lse.is_contiguous()
    assert_close_to_truth(out, lse, q, k, v, floor=1e-3)


def test_dense_lse_auto_picks_a_fused_kernel_and_records_it():
    q, k, v = qkv(2, 4, 2048, 64, torch.bfloat16, "cuda", seed=3)
    with choice.use_chooser(choice.BackendChooser()) as ch:
        out, lse = rettn.attention_with_lse(q, k, v)
        (rec,) = ch.choices()
    assert rec["op"] == "dense+lse" and rec["choice"].startswith(("sdpa:", "triton:"))
    assert "sdpa:flash" in rec["timings_ms"]
    assert_close_to_truth(out, lse, q, k, v, floor=1e-3)


def test_float32_on_cuda_runs_without_the_triton_kernel():
    q, k, v = qkv(1, 2, 1000, 64, torch.float32, "cuda", seed=4)
    layout = selection.topk(q, k, keep=0.25, block_q=128)
    with choice.use_chooser(choice.BackendChooser()) as ch:
        out, lse = rettn.block_sparse_attention(q, k, v, layout, return_lse=True)
        dout, dlse = rettn.attention_with_lse(q, k, v)
        recs = {r["op"]: r for r in ch.choices()}
    assert not recs["sparse+lse"]["choice"].startswith("triton")
    assert recs["sparse+lse"]["skipped"]["triton"] == candidates.FP32_CUDA_REASON
    assert recs["dense+lse"]["choice"] in ("sdpa:efficient", "torch")
    assert_close_to_truth(out, lse, q, k, v, layout, floor=1e-4)
    assert_close_to_truth(dout, dlse, q, k, v, floor=1e-4)
    with pytest.raises(ValueError, match="does not run float32 on CUDA"):
        rettn.block_sparse_attention(q, k, v, layout, backend="triton")
    assert att.auto_backend(q, layout) == "auto"
