"""Every tiny model of tests/tiny_models.py builds, runs on CPU, is deterministic, and its attention
calls (seen by trace_attention) match the facts recorded in its row (docs/families-survey.md).

The position test redraws only the text argument and looks at which key positions of the main
self-attention call change: in the first call of a joint model exactly the text positions change
(the grid tokens have not met the text yet), in a cross-attention model none do.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from tiny_models import (
    ALL_FAMILIES,
    FAMILIES,
    WAN22_BOUNDARY_RATIO,
    perturb_text,
    tiny_inputs,
    tiny_pipeline,
    tiny_pipeline_kwargs,
    tiny_row,
    tiny_shape,
    tiny_transformer,
    trace_attention,
)

NEW = tuple(k for k in ALL_FAMILIES if k not in FAMILIES)
LINEAR = tuple(k for k in NEW if not tiny_row(k).softmax)
SOFTMAX = tuple(k for k in NEW if tiny_row(k).softmax)

# the original eight: (self-attention regex, where text sits in it), as rettn/families.py says
ORIGINAL = {
    "cogvideox": (r"transformer_blocks\.\d+\.attn1", "first"),
    "cogvideox-rope": (r"transformer_blocks\.\d+\.attn1", "first"),
    "pixart": (r"transformer_blocks\.\d+\.attn1", None),
    "hunyuan-dit": (r"blocks\.\d+\.attn1", None),
    "wan": (r"blocks\.\d+\.attn1", None),
    "flux": (r"(single_)?transformer_blocks\.\d+\.attn", "first"),
    "hunyuanvideo": (r"(single_)?transformer_blocks\.\d+\.attn", "last"),
    "ltx-video": (r"transformer_blocks\.\d+\.attn1", None),
}


@pytest.fixture(autouse=True)
def _one_thread():
    # ~60 tiny forwards: thread start-up and contention cost more than they win here
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@functools.lru_cache(maxsize=None)
def _built(key):
    model = tiny_transformer(key)
    return model, tiny_inputs(key, model)


def _first(out):
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def _changed_key_positions(key: str, model, kwargs) -> tuple[list[int], int]:
    """Key positions of the widest main self-attention call that change when only the text
    changes, and that call's key length."""
    pattern = ORIGINAL[key][0] if key in ORIGINAL else tiny_row(key).self_attention
    a = trace_attention(model, kwargs, keep_values=True)
    b = trace_attention(model, perturb_text(key, kwargs), keep_values=True)
    main = [i for i, c in enumerate(a.calls) if c.kind == "sdpa" and c.module and re.fullmatch(pattern, c.module)]
    assert main, f"{key}: no attention call in {pattern}"
    i = max(main, key=lambda j: (a.calls[j].q[2], -j))
    ka, kb = a.calls[i].k_value, b.calls[i].k_value
    assert ka.shape == kb.shape
    diff = (ka - kb).abs().amax(dim=(0, 1, 3))
    return torch.nonzero(diff > 1e-6).flatten().tolist(), ka.shape[2]


@pytest.mark.parametrize("key", ALL_FAMILIES)
def test_builds_runs_deterministic(key):
    m1 = _built(key)[0]
    m2 = tiny_transformer(key, seed=0)
    for (n1, p1), (n2, p2) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), f"{key}: weights differ at {n1}"
    with torch.no_grad():
        y1 = _first(m1(**tiny_inputs(key, m1)))
        y2 = _first(m2(**tiny_inputs(key, m2)))
        y3 = _first(m1(**tiny_inputs(key, m1, seed=1)))
    assert torch.isfinite(y1).all()
    assert torch.equal(y1, y2), f"{key}: same seed, different output"
    assert not torch.equal(y1, y3), f"{key}: the input seed changes nothing"
    other = tiny_transformer(key, seed=1)
    with torch.no_grad():
        assert not torch.equal(y1, _first(other(**tiny_inputs(key, other)))), f"{key}: the weight seed changes nothing"


@pytest.mark.parametrize("key", SOFTMAX)
def test_attention_calls_match_the_row(key):
    row = tiny_row(key)
    model, kwargs = _built(key)
    trace = trace_attention(model, kwargs)
    main = [c for c in trace.of(row.self_attention) if c.kind == "sdpa"]
    assert main, f"{key}: no attention call in {row.self_attention}; silent: {trace.silent}"
    widest = max(c.q[2] for c in main)
    assert widest == row.expected_self_len(), (key, widest, row.expected_self_len())
    assert {c.via for c in main} == {row.via}, (key, {c.via for c in main})
    named = {c.module for c in trace.calls if c.module is not None}
    if row.cross_attention:
        cross = [c for c in trace.of(row.cross_attention) if c.kind in ("sdpa", "softmax")]
        assert cross, f"{key}: no call in {row.cross_attention}"
        assert not set(c.module for c in cross) & set(c.module for c in main), f"{key}: regexes overlap"
    assert all(c.module is not None for c in trace.calls if c.kind == "sdpa"), f"{key}: a call outside the model"
    assert named  # every call is attributed to a named module


@pytest.mark.parametrize("key", [k for k in ALL_FAMILIES if k in ORIGINAL or tiny_row(k).softmax])
def test_text_positions(key):
    model, kwargs = _built(key)
    if key in ORIGINAL:
        shape = tiny_shape(key)
        span = {"first": (0, shape.text_len), "last": (shape.video_tokens, shape.video_tokens + shape.text_len),
                None: None}[ORIGINAL[key][1]]
        modulates = False
    else:
        row = tiny_row(key)
        if row.text_arg is None and "input_ids" not in kwargs:
            pytest.skip(f"{key} takes no text")  # class-conditional (DiT): nothing to place
        span, modulates = row.expected_text_span(), row.text_modulates
    changed, n_keys = _changed_key_positions(key, model, kwargs)
    if modulates:
        # the text reaches every token through the modulation: all or nothing tells nothing
        assert changed, f"{key}: the text changes no key of the self-attention"
    elif span is None:
        assert changed == [], f"{key}: text reaches the self-attention keys at {changed[:5]}..."
    else:
        assert changed == list(range(*span)), (key, changed[:3], changed[-3:], span)
        assert n_keys >= span[1]


@pytest.mark.parametrize("key", LINEAR)
def test_linear_attention_models_make_no_softmax_call(key):
    row = tiny_row(key)
    model, kwargs = _built(key)
    trace = trace_attention(model, kwargs)
    silent = [n for n in trace.silent if re.fullmatch(row.self_attention, n)]
    assert silent, f"{key}: the self-attention modules did not run"
    assert not trace.of(row.self_attention), f"{key}: a softmax/SDPA call in a linear-attention module"
    assert trace.of(row.cross_attention), f"{key}: its cross-attention is softmax and should be seen"


class _ShiftAttention(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        return out * 0.5 + 0.3 if func is F.scaled_dot_product_attention else out


@pytest.mark.parametrize("key", ALL_FAMILIES)
def test_attention_reaches_the_output(key):
    # with random weights a zero-initialised gate (adaLN-zero modulation, a zero output layer)
    # would make every attention result irrelevant: sparse would equal dense trivially
    model, kwargs = _built(key)
    with torch.no_grad():
        y = _first(model(**kwargs))
        with _ShiftAttention():
            y_shifted = _first(model(**kwargs))
    assert (y - y_shifted).abs().max() > 1e-5 * max(1.0, y.abs().max().item()), key


def test_trace_leaves_torch_alone():
    model = tiny_transformer("wan")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    trace = trace_attention(model, tiny_inputs("wan", model))
    assert torch.nn.functional.scaled_dot_product_attention is sdpa
    assert trace.calls and not trace.silent
    calls = len(trace.calls)
    q = torch.randn(1, 1, 4, 8)
    torch.nn.functional.scaled_dot_product_attention(q, q, q)  # outside the trace: not recorded
    assert len(trace.calls) == calls


def test_wan22_two_experts_pipeline():
    pipe = tiny_pipeline("wan2.2-a14b")
    assert pipe.transformer is not pipe.transformer_2
    assert pipe.config.boundary_ratio == WAN22_BOUNDARY_RATIO
    seen = []
    hooks = [
        getattr(pipe, name).register_forward_pre_hook(
            lambda m, a, k, n=name: seen.append((n, float(k["timestep"].flatten()[0]))), with_kwargs=True
        )
        for name in ("transformer", "transformer_2")
    ]
    try:
        frames = pipe(**tiny_pipeline_kwargs("wan2.2-a14b", num_inference_steps=4)).frames
    finally:
        for h in hooks:
            h.remove()
    assert torch.isfinite(frames).all()
    assert len(seen) == 8  # 4 steps, cond and uncond as separate calls
    boundary = WAN22_BOUNDARY_RATIO * 1000
    for name, t in seen:
        assert name == ("transformer" if t >= boundary else "transformer_2"), (name, t)
    assert [n for n, _ in seen[::2]] == ["transformer", "transformer", "transformer_2", "transformer_2"]
    assert all(seen[i][1] == seen[i + 1][1] for i in range(0, 8, 2))  # one timestep per cond/uncond pair
