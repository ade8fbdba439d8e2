"""GPU tier: the Triton kernel at the GPU's block size (128) with the real layout (text tokens
first, their rows and columns dense), against the fp64 truth.

Runs on CUDA, and is skipped on CPU-only machines, except in the GPU check's rehearsal
(``scripts/gpu_check.sh --rehearse`` sets ``RETTN_GPU_TIER=interpret``): there the same tests run
on CPU under the Triton interpreter at shorter sequences, so a broken test shows on CPU first.

Trimmed to what the GPU check compiles in its budget (each distinct dtype / head dim / flag set is
one Triton compile, 1-10 s for 16-bit): bf16 and fp16 at head dims 64, 72 and 128 with lse; head
dim 256 once; float32, which ``backend="triton"`` refuses on CUDA by design (the kernel's fp32 dot
products spill) and ``backend=None`` runs on the torch path or FlexAttention; the sparse step's
rescaled kernel; the dense kernel with lse; FlexAttention's agreement; fp16 overflow and padding
rows (test_safety's checks at block 128); auto on CUDA. ``scripts/gpu_check.sh --rehearse`` prints
the list of specialisations.

:data:`CALLS` says, per test, which (backend, dtype, head dim, block) each test asks of the
dispatcher on CUDA and whether it must run or be refused; the tests take their parameters from
it, and ``tests/test_gpu_rules.py`` holds every row against the dispatcher's rules on CPU (fake
CUDA tensors), so a rule change that strands a GPU-tier test fails in the CPU rehearsal first.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_to_truth, qkv
from test_safety import check_fp16_scores_beyond_fp16_range, check_rows_whose_selected_block_is_nearly_all_padding

import rettn
from rettn.errors import InputError
from rettn.ops import selection

ON_CUDA = torch.cuda.is_available()
REHEARSE = not ON_CUDA and os.environ.get("RETTN_GPU_TIER") == "interpret"
DEV = "cuda" if ON_CUDA else "cpu"
BLOCK = 128
# CUDA: 226 text + 1,550 video tokens (a tail block); the rehearsal: 26 + 278, three blocks.
# Sequence lengths are multiples of 16 where a test allows, as at the real shape (17,776): the
# JIT compiles another variant for lengths that are not.
B, H, SEQ, TEXT = (2, 4, 1776, 226) if ON_CUDA else (1, 2, 304, 26)

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
RUNS, REFUSED = "runs", "refused"
FP32_REFUSAL = "does not run float32 on CUDA"  # rettn/ops/_dispatch.py's message for backend='triton'
# test -> [(backend, dtype, head dim, block (None: dense, no layout), RUNS or REFUSED)] on CUDA
CALLS = {
    "test_sparse_with_lse_real_layout": [("triton", dt, d, BLOCK, RUNS) for dt in (BF16, FP16) for d in (64, 72, 128)],
    "test_sparse_with_lse_once": [("triton", FP32, 64, BLOCK, REFUSED), ("triton", BF16, 256, BLOCK, RUNS)],
    "test_float32_runs_with_auto": [(None, FP32, 64, BLOCK, RUNS)],
    "test_sparse_step_kernels": [("triton", BF16, 64, BLOCK, RUNS)],
    "test_dense_attention_with_lse": [(None, BF16, 64, None, RUNS), ("triton", BF16, 64, None, RUNS),
                                      (None, FP16, 64, None, RUNS)],
    "test_triton_and_flex_agree": [("triton", BF16, 64, BLOCK, RUNS), ("flex", BF16, 64, BLOCK, RUNS)],
    "test_fp16_scores_beyond_fp16_range_at_gpu_block": [("triton", FP16, 64, BLOCK, RUNS)],
    "test_padding_rows_at_gpu_block": [("triton", BF16, 64, BLOCK, RUNS)],
    "test_auto_backend_on_cuda": [(None, BF16, 64, 64, RUNS)],
    "test_adaptive_measure_at_gpu_block": [("triton", BF16, 64, BLOCK, RUNS)],
}


def _ids(rows):
    return [f"{b}-{str(dt).replace('torch.', '')}-{d}-{e}" for b, dt, d, _, e in rows]


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (ON_CUDA or REHEARSE), reason="needs a CUDA GPU (or RETTN_GPU_TIER=interpret "
                       "with TRITON_INTERPRET=1: the GPU check's CPU rehearsal)"),
]


def _real_layout(q, k, keep=0.0625):
    return selection.topk(q, k, keep=keep, block_q=BLOCK, dense_spans=[(0, TEXT)])


@pytest.mark.parametrize("backend,dtype,head_dim,block,expect", CALLS["test_sparse_with_lse_real_layout"],
                         ids=_ids(CALLS["test_sparse_with_lse_real_layout"]))
def test_sparse_with_lse_real_layout(backend, dtype, head_dim, block, expect):
    q, k, v = qkv(B, H, SEQ, head_dim, dtype, DEV, seed=head_dim)
    layout = _real_layout(q, k)
    out, lse = rettn.block_sparse_attention(q, k, v, layout, return_lse=True, backend=backend)
    assert_close_to_truth(out, lse, q, k, v, layout, floor=1e-3)


@pytest.mark.parametrize("backend,dtype,head_dim,block,expect", CALLS["test_sparse_with_lse_once"],
                         ids=_ids(CALLS["test_sparse_with_lse_once"]))
def test_sparse_with_lse_once(backend, dtype, head_dim, block, expect):
    """Head dim 256: one compile. float32 on CUDA: backend='triton' is refused with the reason (the
    rehearsal's interpreter still runs it on CPU, where the rule does not apply)."""
    q, k, v = qkv(B, H, SEQ, head_dim, dtype, DEV, seed=head_dim + 1)
    layout = _real_layout(q, k)
    if expect == REFUSED and ON_CUDA:
        with pytest.raises(InputError, match=FP32_REFUSAL) as e:
            rettn.block_sparse_attention(q, k, v, layout, return_lse=True, backend=backend)
        assert "backend=None" in str(e.value)  # and it says what runs instead
        return
    out, lse = rettn.block_sparse_attention(q, k, v, layout, return_lse=True, backend=backend)
    assert_close_to_truth(out, lse, q, k, v, layout, floor=1e-3 if dtype != torch.float32 else 1e-5)


@pytest.mark.skipif(not ON_CUDA, reason="the float32 rule is CUDA's; auto on CPU is the torch path")
def test_float32_runs_with_auto():
    """What the refusal advises: backend=None runs float32 on CUDA (the torch path or FlexAttention,
    timed), never the Triton kernel, to fp32 accuracy."""
    import rettn.ops.attention as att

    q, k, v = qkv(B, H, SEQ, 64, FP32, DEV, seed=65)
    layout = _real_layout(q, k)
    out, lse = rettn.block_sparse_attention(q, k, v, layout, return_lse=True, backend=None)
    assert_close_to_truth(out, lse, q, k, v, layout, floor=1e-4)  # fp32 accuracy (bf16 errs ~1e-2)
    rows = [r for r in att.backend_choices() if r["op"] == "sparse+lse" and r["dtype"] == "float32"]
    assert rows and all(not r["choice"].startswith("triton") for r in rows), rows
    assert all("triton" in r["skipped"] for r in rows), rows


def test_sparse_step_kernels():
    """The sparse step's two kernels: plain sparse attention (no lse) and rho * O + R fused."""
    q, k, v = qkv(B, H, SEQ, 64, torch.bfloat16, DEV, seed=3)
    layout = _real_layout(q, k, keep=0.03125)
    plain = rettn.block_sparse_attention(q, k, v, layout, backend="triton")
    assert_close_to_truth(plain, None, q, k, v, layout, floor=1e-3)
    g = torch.Generator().manual_seed(3)
    rho = (0.5 + 0.5 * torch.rand(B, H, SEQ, generator=g)).to(DEV)
    residual = (0.1 * torch.randn(B, H, SEQ, 64, generator=g)).to(DEV, torch.bfloat16)
    out = rettn.ops.attention.sparse_attention_rescaled(q, k, v, layout, rho, residual, backend="triton")
    assert out.dtype == torch.bfloat16
    expected = rho.unsqueeze(-1) * plain.float() + residual.float()
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_dense_attention_with_lse(dtype):
    """The default path (PyTorch's flash kernels, which return the lse), and for bf16 the Triton
    dense kernel."""
    q, k, v = qkv(B, 3, SEQ, 64, dtype, DEV, seed=1)
    backends = [b for b, dt, *_ in CALLS["test_dense_attention_with_lse"] if dt == dtype]
    for backend in backends:
        out, lse = rettn.attention_with_lse(q, k, v, backend=backend)
        assert_close_to_truth(out, lse, q, k, v, floor=1e-3)
        torch.testing.assert_close(out.float(), F.scaled_dot_product_attention(q, k, v).float(),
                                   atol=2e-2, rtol=2e-2)


def test_triton_and_flex_agree():
    """Same layout, same answer (with lse: the cache step's path; compiled FlexAttention on CUDA)."""
    q, k, v = qkv(1, 4, 2048 if ON_CUDA else SEQ, 64, torch.bfloat16, DEV, seed=2)
    layout = selection.topk(q, k, keep=0.125, block_q=BLOCK)
    a, lse_a = rettn.block_sparse_attention(q, k, v, layout, return_lse=True, backend="triton")
    b, lse_b = rettn.block_sparse_attention(q, k, v, layout, return_lse=True, backend="flex")
    torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse_a, lse_b, atol=2e-2, rtol=1e-3)


def test_fp16_scores_beyond_fp16_range_at_gpu_block():
    check_fp16_scores_beyond_fp16_range("triton", DEV, block=BLOCK, seq=SEQ)


def test_padding_rows_at_gpu_block():
    check_rows_whose_selected_block_is_nearly_all_padding("triton", DEV, block=BLOCK, dtype=torch.bfloat16)


@pytest.mark.skipif(not ON_CUDA, reason="auto picks the torch path for CPU tensors (tests/test_kernels.py "
                    "::test_auto_backend_on_cpu_is_torch)")
def test_auto_backend_on_cuda():
    """backend=None on CUDA passes ``"auto"`` on (the choice is made at run time, inside the op);
    the first call measures and stores a real backend, and its answer is right."""
    import rettn.ops.attention as att

    q, k, v = qkv(1, 2, 512, 64, BF16, DEV, seed=7)
    layout = selection.topk(q, k, keep=0.25, block_q=64)
    assert att.resolve_backend(None, q, layout) == "auto"
    assert att.auto_backend(q, layout) == "auto"  # nothing chosen yet for this shape
    out = rettn.block_sparse_attention(q, k, v, layout, backend=None)
    assert_close_to_truth(out, None, q, k, v, layout, floor=1e-3)
    chosen = att.auto_backend(q, layout)
    assert chosen != "auto" and chosen.split(":")[0] in ("triton", "flex", "torch"), chosen


def test_adaptive_measure_at_gpu_block():
    """The adaptive schedule's staleness measure (rettn.core.adaptive.stale_error) in bf16 on the
    Triton kernels at block 128: the error the engine records at a cache step is the one a
    float64 torch reference gives for the same stale statistics and the same heads."""
    from rettn.core.config import RettnConfig
    from rettn.core.engine import CallInfo, Engine
    from rettn.ops.reference import block_sparse_reference

    (backend, dtype, head_dim, block, _), = CALLS["test_adaptive_measure_at_gpu_block"]
    eng = Engine(RettnConfig(keep=0.0625, block_size=block, warmup="auto", refresh_interval="auto", tolerance=10.0,
                             min_seq_len=0, num_inference_steps=10, backend=backend), n_layers=1, family="test")
    info = CallInfo(layer=0, kind="self", dense_spans=[(0, TEXT)])
    expected = None
    for step in range(3):  # dense, cache, cache (measured: one-step-old statistics)
        q, k, v = qkv(B, H, SEQ, head_dim, dtype, DEV, seed=10 + step)
        eng.on_forward(1000.0 - 100 * step)
        old = next(iter(eng.cache.values()), None)
        if old is not None:
            heads = slice(0, H, max(1, -(-H // 4)))
            q64, k64, v64 = (t[:, heads].double() for t in (q, k, v))
            layout = old.layout if old.layout.kv_num_blocks.shape[1] == 1 else type(old.layout)(
                old.layout.kv_num_blocks[:, heads], old.layout.kv_indices[:, heads], block, block, SEQ, SEQ)
            pred = old.rho[:, heads].double().unsqueeze(-1) * block_sparse_reference(
                q64, k64, v64, layout, compute_dtype=torch.float64)[0] + old.residual[:, heads].double()
            ref = F.scaled_dot_product_attention(q64, k64, v64)
            expected = float((pred - ref).norm() / ref.norm())
        eng.attend(q, k, v, head_dim ** -0.5, info)
    (refresh,) = eng.stats().refreshes
    assert refresh.step == 2 and refresh.age == 1
    assert abs(refresh.error - expected) < 0.01 + 0.02 * expected, (refresh.error, expected)
