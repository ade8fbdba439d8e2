"""GPU tier: residual offload (residual_device="cpu") on CUDA: pinned host copies on a side stream,
prefetch of the next layer's R, and results identical to keeping R on the device."""

import pytest
import torch
from helpers import qkv

from rettn.core.config import RettnConfig
from rettn.core.engine import CallInfo, Engine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def run_schedule(residual_device, layers=4, steps=7):
    cfg = RettnConfig(keep=0.125, block_size=128, warmup=1, refresh_interval=3, min_seq_len=0, ramp=0.04,
                      residual_device=residual_device, backend="triton")
    eng = Engine(cfg, n_layers=layers, family="test")
    inputs = [qkv(2, 4, 1024, 64, torch.bfloat16, "cuda", seed=layer) for layer in range(layers)]
    outs = []
    for step in range(steps):
        eng.on_forward(1000.0 - 100 * step)
        for layer in range(layers):
            q, k, v = (x * (1 + 0.01 * step) for x in inputs[layer])
            # work on the compute stream between layers, as the model's MLP would be
            torch.randn(4096, 4096, device="cuda").matmul(torch.randn(4096, 4096, device="cuda"))
            out = eng.attend(q, k, v, 64 ** -0.5, CallInfo(layer=layer, kind="self"))
            outs.append(None if out is None else out.clone())
    torch.cuda.synchronize()
    return eng, outs


def test_offload_on_cuda_gives_identical_results_and_prefetches():
    base, base_outs = run_schedule(None)
    off, off_outs = run_schedule("cpu")
    for a, b in zip(base_outs, off_outs):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)
    entries = list(off.cache.values())
    assert entries and all(e.residual.device.type == "cpu" and e.residual.is_pinned() for e in entries)
    assert all(e.rho.device.type == "cuda" for e in entries)  # rho (1/D of R) stays on the device
    counts = off.residuals.counts
    assert counts["fetched"] > 0 and counts["prefetch_hits"] >= counts["fetched"] - 2, counts
    assert off.stats().cached_bytes == base.stats().cached_bytes


def test_offloaded_residual_survives_its_device_source_being_freed():
    from rettn.core.residual import ResidualStore

    store = ResidualStore("cpu")
    r = torch.randn(2, 8, 4096, 64, device="cuda")
    expected = r.to(torch.bfloat16).cpu()
    host = store.put(r, torch.bfloat16)
    del r
    torch.randn(2, 8, 4096, 64, device="cuda")  # would reuse r's memory if the copy had not held it
    back = store.fetch(host, torch.device("cuda"))
    torch.cuda.synchronize()
    assert torch.equal(back.cpu(), expected)


def test_adaptive_measure_reads_offloaded_r_after_its_copy_lands():
    """The adaptive schedule's measure slices the offloaded R on the host (its sampled heads): it
    waits for the side stream's copy first, so its errors equal those with R on the device."""
    def errors(residual_device):
        cfg = RettnConfig(keep=0.125, block_size=128, warmup="auto", refresh_interval="auto", tolerance=10.0,
                          min_seq_len=0, num_inference_steps=8, residual_device=residual_device, backend="triton")
        eng = Engine(cfg, n_layers=2, family="test")
        for step in range(6):
            eng.on_forward(1000.0 - 100 * step)
            for layer in range(2):
                q, k, v = qkv(2, 8, 1024, 64, torch.bfloat16, "cuda", seed=10 * step + layer)
                eng.attend(q, k, v, 64 ** -0.5, CallInfo(layer=layer, kind="self"))
        return [(r.step, r.age, r.error) for r in eng.stats().refreshes]

    on_device, offloaded = errors(None), errors("cpu")
    assert len(on_device) >= 2 and on_device == offloaded
