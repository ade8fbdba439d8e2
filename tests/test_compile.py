"""torch.compile: rettn's kernels are custom ops with fake implementations, and a patched
transformer compiles with no graph break (fullgraph=True), agrees with eager, and does not
recompile when the selected blocks change between steps.

The compiler backend is ``aot_eager``: it runs dynamo (graph capture, guards, recompiles) and
AOT autograd over fake tensors (the custom op's fake implementation), without Inductor's C++
code generation, which needs a compiler toolchain and minutes on a 2-core CI machine.
scripts/gpu_check.sh runs the Inductor path on a GPU.
"""

import pytest
import torch
from tiny_models import tiny_inputs, tiny_transformer
from torch._dynamo.utils import counters

import rettn
from rettn.ops import selection
from rettn.ops.attention import sparse_attention_rescaled
from helpers import qkv, random_layout

TIMESTEPS = (900, 800, 700, 600, 500, 400, 300)
CONFIG = dict(keep=0.25, block_size=32, warmup=1, refresh_interval=3, dense_final=0, ramp=0.01,
              num_inference_steps=len(TIMESTEPS), min_seq_len=0)


def _run(model, inputs, calls=1):
    """One generation; ``calls=2``: two transformer calls per step (CFG as two calls, as Wan's
    pipeline does: rettn keeps a CFG branch each)."""
    outs = []
    with torch.no_grad():
        for t in TIMESTEPS:
            for _ in range(calls):
                outs.append(model(**{**inputs, "timestep": torch.full_like(inputs["timestep"], t)})[0])
    return outs


def _blocks(model):
    return model.transformer_blocks if hasattr(model, "transformer_blocks") else model.blocks


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_custom_op_fake_and_schema():
    """torch.library.opcheck: schema, fake (meta) implementation and AOT dispatch agree with the
    real kernel, for sparse, dense, lse and rescaled calls, on contiguous and strided inputs."""
    q, k, v = qkv(1, 2, 100, 16, seed=1)
    layout = random_layout(1, 2, 100, 100, 32, seed=2)
    n, idx = layout.kv_num_blocks, layout.kv_indices
    rho = torch.rand(1, 2, 100) * 0.5 + 0.5
    residual = torch.randn(1, 2, 100, 16) * 0.1
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # a (B, S, H, D) buffer seen as (B, H, S, D)
    cases = [
        (q, k, v, n, idx, 32, 32, 0.25, "torch", True, None, None),
        (qt, k, v, n, idx, 32, 32, 0.25, "torch", False, None, None),
        (q, k, v, None, None, 0, 0, 0.25, "torch", True, None, None),
        (q, k, v, n, idx, 32, 32, 0.25, "torch", False, rho, residual),
    ]
    for args in cases:
        torch.library.opcheck(torch.ops.rettn.sparse_attention.default, args)
    out, _ = torch.ops.rettn.sparse_attention(*cases[1])
    assert out.stride() == qt.stride()  # the op returns q's strides, as its fake says


def test_attend_op_schema_fake_and_engine_state():
    """rettn::attend (one op per attention call): opcheck's schema, fake and AOT checks at a dense
    step (deterministic output); then the same op at cache and sparse steps matches the engine's
    eager calls and updates the layer's state, found through the slot's token tensor."""
    from rettn.core.attend_op import call as op_call
    from rettn.core.engine import CallInfo, Engine
    from rettn.core.config import RettnConfig

    q, k, v = qkv(1, 2, 128, 16, seed=7)
    cfg = RettnConfig(keep=0.25, block_size=32, warmup=1, refresh_interval=3, min_seq_len=0, ramp=0.0)
    eager, compiled = (Engine(cfg, n_layers=1, family="test") for _ in range(2))
    outs = {}
    for name, eng in (("eager", eager), ("op", compiled)):
        slot = eng.slot(0)
        info = CallInfo(kind="self", slot=slot, dense_spans=[(0, 10)])
        outs[name] = []
        for t in (900.0, 800.0, 700.0):  # dense, cache, sparse
            eng.on_forward(t)
            if name == "eager":
                outs[name].append(eng.attend(q, k, v, 0.25, info))
            else:
                if t == 900.0:
                    args = (q, k, v, None, slot.token, 0.25, "self", [0, 10], [], [], 0, -1, 0, "")
                    torch.library.opcheck(torch.ops.rettn.attend.default, args)
                outs[name].append(op_call(slot, q, k, v, 0.25, info))
    for a, b in zip(outs["eager"], outs["op"]):
        torch.testing.assert_close(b, a)
    assert compiled.stats().kinds() == ["dense", "cache", "sparse"]
    assert list(compiled.cache) == list(eager.cache) == [(0, 0, None)]
    assert compiled.stats().dense_backend == "sdpa:cpu"


def test_ops_compile_without_graph_break():
    """The public ops inside a fullgraph-compiled function: no break, same numbers as eager."""
    q, k, v = qkv(2, 2, 130, 16, seed=3)

    def f(q, k, v):
        layout = selection.topk(q, k, 0.3, block_q=32, dense_spans=[(0, 20)])
        out, lse = rettn.block_sparse_attention(q, k, v, layout, return_lse=True)
        dense, dlse = rettn.attention_with_lse(q, k, v)
        rho = torch.exp(lse - dlse)
        return sparse_attention_rescaled(q, k, v, layout, rho, dense - out), layout.density_tensor()

    eager = f(q, k, v)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled[1], eager[1])


def _dense_compiled_graphs(family, how, inputs_kw, model_kw, calls=1):
    """Graphs a compiled model WITHOUT rettn needs over the same run (CogVideoX: two, for the two
    strides its blocks' ``hidden_states`` arrive with): what rettn may cost at most."""
    torch._dynamo.reset()
    counters.clear()
    model = tiny_transformer(family, 0, qk_gain=8.0, **model_kw)
    inputs = tiny_inputs(family, model, **inputs_kw)
    _compile(model, how)
    _run(model, inputs, calls)
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    counters.clear()
    return graphs


def _compile(model, how):
    if how == "blocks":  # regional compilation, as diffusers' compile_repeated_blocks does
        for block in _blocks(model):
            block.compile(backend="aot_eager", fullgraph=True)
    else:
        model.compile(backend="aot_eager", fullgraph=True)


@pytest.mark.parametrize("family,how,batch", [("cogvideox", "blocks", 1), ("wan", "blocks", 1),
                                              ("hunyuanvideo", "blocks", 2), ("flux", "whole", 1)])
def test_compiled_transformer_matches_eager(family, how, batch):
    """CogVideoX (processor calls F.scaled_dot_product_attention) and Wan (diffusers'
    dispatch_attention_fn) compiled block by block, as diffusers' regional compilation does;
    Flux compiled whole. fullgraph=True: any graph break is an error. HunyuanVideo with a batch of
    two whose second sample pads its text: a key-padding mask, split by rows inside the op. Wan
    with two transformer calls per step (CFG as two calls: two branches of statistics).

    The schedule runs dense, cache and sparse steps (D C S S C S S), the selection changes from
    step to step (reselect="step"), and the recompile limit is the number of graphs the same
    model compiled WITHOUT rettn needs: every decision that differs per step kind, layer or CFG
    branch is made inside rettn's attention op, where Dynamo does not guard on it. So rettn
    compiles exactly as many graphs as dense does, and a second generation compiles nothing."""
    model_kw = {"num_layers": 4} if family == "cogvideox" else {}
    calls = 2 if family == "wan" else 1
    dense_graphs = _dense_compiled_graphs(family, how, dict(batch=batch), model_kw, calls)
    assert 1 <= dense_graphs <= 2

    model = tiny_transformer(family, 0, qk_gain=8.0, **model_kw)
    inputs = tiny_inputs(family, model, batch=batch)
    handle = rettn.apply_rettention(model, reselect="step", **CONFIG)

    # the eager run, recording the blocks top-k selects at each step
    chosen = []
    real_topk = selection.topk

    def recording_topk(*args, **kwargs):
        layout = real_topk(*args, **kwargs)
        chosen.append(layout.kv_indices.clone())
        return layout

    selection.topk = recording_topk
    try:
        eager = _run(model, inputs, calls)
    finally:
        selection.topk = real_topk
    kinds = handle.stats().kinds()
    assert kinds == ["dense", "cache", "sparse", "sparse", "cache", "sparse", "sparse"]
    assert len({tuple(c.flatten().tolist()) for c in chosen}) > 1  # the selection does change

    _compile(model, how)
    # a recompile beyond dense's count is an error (not a silent fall back to eager)
    with torch._dynamo.config.patch(recompile_limit=dense_graphs, fail_on_recompile_limit_hit=True):
        compiled = _run(model, inputs, calls)
        assert handle.stats().kinds() == kinds
        for a, b in zip(eager, compiled):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        graphs = counters["stats"]["unique_graphs"]
        assert graphs == dense_graphs, dict(counters["stats"])
        assert not counters["graph_break"]

        compiled_again = _run(model, inputs, calls)  # a second generation: nothing new to compile
    assert counters["stats"]["unique_graphs"] == graphs
    for a, b in zip(eager, compiled_again):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    stats = handle.stats()
    assert stats.kinds() == kinds and stats.mean_density() < 1.0  # it did run sparse
    if calls > 1:  # statistics per CFG branch
        assert {key[1] for key in handle.engine.cache} == {0, 1}
    if batch > 1:  # the padded sample ran on its own rows, inside the op
        assert {key[2] for key in handle.engine.cache} == {0, 1}
    assert stats.dense_backend == "sdpa:cpu"  # rettn's own dense steps: PyTorch's CPU flash kernel
    assert "dense steps on sdpa:cpu" in str(handle.describe())
    handle.remove()


def test_bench_compile_script_runs(tmp_path):
    """scripts/bench_compile.py (the GPU check's compile benchmark) on a shrunk model: it runs all
    four variants and writes its report (the numbers are not judged here)."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_compile.py"
    spec = importlib.util.spec_from_file_location("bench_compile", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "compile.json"
    assert bench.main(["--arch", "pixart-sigma", "--layers", "1", "--height", "128", "--width", "128",
                       "--steps", "3", "--min-seq-len", "0", "--compile-backend", "aot_eager", "--device", "cpu",
                       "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"dense eager", "dense compiled", "rettn eager", "rettn compiled"}
    assert all(v > 0 for v in report["ratios"].values())
    # the dense baseline runs rettn's dense kernel (CPU: PyTorch's CPU flash kernel), named
    assert report["dense_backend"] == "sdpa:cpu"
    assert {r["dense_backend"] for r in report["results"].values()} == {"sdpa:cpu"}
    assert report["graphs"]["rettn"] == report["graphs"]["dense"]  # no recompile per step kind
