"""Residual offload (RettnConfig.residual_device="cpu") and the residual store, on CPU: the same
results as without offload, and the cache-step order that drives the prefetch on CUDA."""

import gc

import pytest
import torch
from helpers import qkv

from rettn.core.config import RettnConfig
from rettn.core.engine import CallInfo, Engine
from rettn.core.residual import ResidualStore


def run_schedule(residual_device, layers=3, branches=2, steps=7, residual_dtype=None):
    """Every attention output of a dense / cache / sparse schedule over ``layers`` layers and
    ``branches`` CFG branches (each branch its own forward, as Wan calls them)."""
    cfg = RettnConfig(keep=0.25, block_size=32, warmup=1, refresh_interval=3, min_seq_len=0, ramp=0.04,
                      residual_device=residual_device, residual_dtype=residual_dtype)
    eng = Engine(cfg, n_layers=layers, family="test")
    inputs = [[qkv(1, 2, 128, 32, seed=10 * layer + branch) for branch in range(branches)]
              for layer in range(layers)]
    outs, kinds = [], []
    for step in range(steps):
        t = 1000.0 - 100 * step
        for branch in range(branches):
            eng.on_forward(t)
            for layer in range(layers):
                q, k, v = (x * (1 + 0.01 * step) for x in inputs[layer][branch])  # inputs drift
                outs.append(eng.attend(q, k, v, 32 ** -0.5, CallInfo(layer=layer, kind="self")))
        kinds.append(eng.kind)
    return eng, outs, kinds


@pytest.mark.parametrize("residual_dtype", [None, "bfloat16"])
def test_offload_gives_identical_results(residual_dtype):
    base, base_outs, kinds = run_schedule(None, residual_dtype=residual_dtype)
    off, off_outs, kinds_off = run_schedule("cpu", residual_dtype=residual_dtype)
    assert kinds == kinds_off and kinds.count("sparse") >= 3 and "cache" in kinds
    assert len(base_outs) == len(off_outs)
    for a, b in zip(base_outs, off_outs):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)
    assert off.residuals.counts["offloaded"] == 6 * kinds.count("cache") and base.residuals.counts["offloaded"] == 0
    for entry in off.cache.values():
        assert entry.residual.device.type == "cpu"
        assert entry.rho.device == entry.residual.device  # CPU run: rho is where the activations are
    assert off.stats().cached_bytes == base.stats().cached_bytes


def test_put_keeps_dtype_and_place_and_fetch_is_a_no_op_where_it_is():
    r = torch.randn(2, 3, 16, 8)
    on = ResidualStore(None)
    kept = on.put(r, torch.bfloat16)
    assert kept.dtype == torch.bfloat16 and kept.device == r.device and on.next_after(kept) is None
    assert on.fetch(kept, r.device) is kept
    off = ResidualStore("cpu")
    stored = off.put(r, torch.float32)
    assert torch.equal(stored, r) and off.fetch(stored, torch.device("cpu")) is stored
    with pytest.raises(ValueError, match="residual device must be None or 'cpu'"):
        ResidualStore("cuda")


def test_prefetch_order_follows_cache_step_order_and_wraps():
    store = ResidualStore("cpu")
    rs = [store.put(torch.full((4,), float(i)), torch.float32) for i in range(4)]
    assert [store.next_after(r) for r in rs] == [rs[1], rs[2], rs[3], rs[0]]
    # the next cache step replaces layer 1's residual: it moves to the end of the order
    new1 = store.put(torch.full((4,), 10.0), torch.float32)
    del rs[1]
    gc.collect()
    assert store.next_after(rs[0]) is rs[1]  # old layer 2
    assert store.next_after(rs[2]) is new1 and store.next_after(new1) is rs[0]
    assert store.next_after(torch.zeros(4)) is None  # not a stored residual
    assert len(store._order) == 4 and len(store._live) == 4


def test_engine_offload_order_is_layer_then_branch():
    eng, _, _ = run_schedule("cpu", layers=3, branches=2, steps=3)
    slots = sorted(eng.slots.values(), key=lambda s: s.layer)
    order = [slots[layer].entries[(branch, None)].residual for branch in range(2) for layer in range(3)]
    for a, b in zip(order, order[1:] + order[:1]):
        assert eng.residuals.next_after(a) is b
