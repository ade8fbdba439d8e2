"""Does sparsity pay? The engine's cost meter (rettn/core/pays.py): a sparse step measured slower
than the dense call it replaces is reported in stats(), warned about once, and with
fallback_when_slower runs dense from then on; and the line `rettn generate --compare` prints."""

import re
import warnings

import pytest
import torch
from helpers import qkv

import rettn
from rettn.core import pays
from rettn.core.config import RettnConfig
from rettn.core.engine import SLOWER, CallInfo, Engine
from rettn.errors import RettnError, RettnWarning, SlowerThanDenseWarning
from rettn.tools import breakeven

STEPS = 14  # 4 dense (the measured dense calls: 1 skipped + 3), then cache / sparse / sparse ...


def make(fallback: bool, layers: int = 1):
    cfg = RettnConfig(keep=0.25, block_size=32, warmup=4, refresh_interval=3, min_seq_len=0, ramp=0.0,
                      num_inference_steps=STEPS, fallback_when_slower=fallback)
    return Engine(cfg, n_layers=layers, family="test")


def fake_clock(monkeypatch, eng, dense_s: float, sparse_s: float):
    """The meter's clock advances by ``dense_s`` in each dense call and ``sparse_s`` in each
    sparse-step call (the real kernels still run)."""
    now = [0.0]
    monkeypatch.setattr(pays.time, "perf_counter", lambda: now[0])
    dense, sparse = eng._dense, eng._sparse_step

    def timed(fn, seconds):
        def run(*a, **kw):
            now[0] += seconds
            return fn(*a, **kw)
        return run

    monkeypatch.setattr(eng, "_dense", timed(dense, dense_s))
    monkeypatch.setattr(eng, "_sparse_step", timed(sparse, sparse_s))


def generation(eng, q, k, v):
    outs = []
    for step in range(STEPS):
        eng.on_forward(1000.0 - 50 * step)
        outs.append(eng.attend(q, k, v, q.shape[-1] ** -0.5, CallInfo(layer=0, kind="self")))
    return outs


def test_slower_sparse_is_reported_warned_once_and_falls_back(monkeypatch):
    q, k, v = qkv(1, 2, 256, 32, seed=3)
    eng = make(fallback=True)
    fake_clock(monkeypatch, eng, dense_s=0.001, sparse_s=0.004)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = generation(eng, q, k, v)
        first = eng.stats()
        generation(eng, q, k, v)  # a second generation: no second warning for the same shape
    slow = [w for w in caught if issubclass(w.category, SlowerThanDenseWarning)]
    assert len(slow) == 1, [str(w.message) for w in caught]
    assert "(1, 2, 256, 32)" in str(slow[0].message) and "4.00 ms" in str(slow[0].message)
    assert "1.00 ms" in str(slow[0].message) and "fallback_when_slower=True" in str(slow[0].message)
    stats = eng.stats()
    assert [c.shape for c in stats.slower_shapes] == [(1, 2, 256, 32)]
    cost = stats.slower_shapes[0]
    assert cost.dense_s == pytest.approx(0.001) and cost.sparse_s == pytest.approx(0.004) and cost.fallback
    assert "SLOWER than dense" in str(stats) and "run dense (fallback_when_slower)" in str(stats)
    # the schedule: steps 0-3 dense; 4 cache, 5-6 sparse, 7 cache, 8-9 sparse (the 4th sparse call
    # gives the verdict), then every call of this shape runs dense with the reason SLOWER
    kinds = stats.kinds()
    assert kinds[:10] == ["dense"] * 4 + ["cache", "sparse", "sparse", "cache", "sparse", "sparse"]
    for record in stats.steps:  # 2nd generation: the verdict stands from its first sparse-eligible step
        if record.kind != "dense":
            assert record.dense_reasons == {SLOWER: 1} and record.sparse_calls == 0 and record.dense_calls == 1
    dense = rettn.attention_with_lse(q, k, v)[0]
    for out in outs[10:]:  # 1st generation after the verdict: rettn's dense output exactly
        torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
    assert [r.sparse_calls for r in first.steps[4:10]] == [1] * 6  # before the verdict: sparse kernels
    assert all(r.dense_reasons == {SLOWER: 1} for r in first.steps[10:])  # after it: dense, and why


def test_slower_without_fallback_warns_and_stays_sparse(monkeypatch):
    q, k, v = qkv(1, 2, 256, 32, seed=4)
    eng = make(fallback=False)
    fake_clock(monkeypatch, eng, dense_s=0.001, sparse_s=0.002)
    with pytest.warns(SlowerThanDenseWarning, match="--fallback-when-slower"):
        generation(eng, q, k, v)
    stats = eng.stats()
    assert len(stats.slower_shapes) == 1 and not stats.slower_shapes[0].fallback
    assert all(SLOWER not in r.dense_reasons for r in stats.steps)
    assert all(r.sparse_calls == 1 for r in stats.steps if r.kind != "dense")  # every call still sparse


def test_faster_sparse_gives_no_warning_and_no_fallback(monkeypatch):
    q, k, v = qkv(1, 2, 256, 32, seed=5)
    eng = make(fallback=True)
    fake_clock(monkeypatch, eng, dense_s=0.004, sparse_s=0.001)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowerThanDenseWarning)
        generation(eng, q, k, v)
    stats = eng.stats()
    assert len(stats.step_costs) == 1 and stats.slower_shapes == []
    assert "faster than dense" in str(stats)
    assert all(SLOWER not in r.dense_reasons for r in stats.steps)


def test_warning_is_in_the_error_hierarchy():
    assert issubclass(SlowerThanDenseWarning, RettnWarning)
    assert issubclass(SlowerThanDenseWarning, RettnError) and issubclass(SlowerThanDenseWarning, UserWarning)


def test_fallback_flag_is_a_generate_option_with_help():
    from rettn.tools.args import config_flag
    from rettn.tools.cli import build_parser

    assert config_flag("fallback_when_slower").flag == "--fallback-when-slower"
    parser = build_parser()
    args = parser.parse_args(["generate", "--prompt", "x", "--fallback-when-slower"])
    assert args.fallback_when_slower is True
    sub = parser._subparsers._group_actions[0].choices["generate"]
    assert "measured slower than dense" in sub.format_help().replace("\n", " ").replace("  ", " ")
    with pytest.raises(rettn.errors.ConfigError, match="fallback_when_slower must be True or False"):
        RettnConfig(fallback_when_slower="yes")


def test_pays_line_says_where_sparse_pays():
    cpu = torch.device("cpu")
    rows = [(1024, 0.01, 0.05), (2048, 0.04, 0.08), (4096, 0.16, 0.1)]
    text = breakeven.line((0.123, "dense"), 1040, 4096, rows, cpu, 0.125)
    assert text == ("rettn here: attention is 12% of a dense step at 1,040 tokens; on this CPU a sparse step's "
                    "attention (keep 0.125) first beats dense at 4k tokens (slower at 1k-2k), so sparsity does "
                    "not pay at this run's 1,040 tokens")
    never = breakeven.line(None, 1040, None, rows[:2], cpu, 0.125)
    assert never.endswith("was slower than dense at every length measured (1k-2k tokens), so sparsity does not pay here")
    assert breakeven.line((0.5, "dense"), 8192, 1024, rows[2:], cpu, 0.1).endswith(
        "first beats dense at 1k tokens, so sparse attention pays at this run's 8,192 tokens")


def test_pays_from_measures_the_public_ops():
    first, longest, rows = breakeven.pays_from(2, 32, torch.float32, torch.device("cpu"), 0.25, 32,
                                               lengths=(256, 512), budget_s=30.0)
    assert [n for n, _, _ in rows] == ([256, 512] if first != 256 else [256]) and longest == rows[-1][0]
    assert all(d > 0 and s > 0 for _, d, s in rows)
    assert first is None or rows[-1][2] < rows[-1][1]


def test_generate_compare_prints_the_pays_line(tmp_path, capsys):
    from rettn.tools.cli import main

    code = main(["generate", "--prompt", "a red circle moving right", "--compare", "--steps", "6", "--no-progress",
                 "--out", str(tmp_path / "c.gif"), "--json", str(tmp_path / "s.json")])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = [ln for ln in out.splitlines() if ln.startswith("rettn here: ")]
    assert len(lines) == 1, out
    assert re.search(r"attention is \d+% of a dense step at 1,040 tokens; on this CPU a sparse step's attention "
                     r"\(keep 0\.125\) ", lines[0]), lines[0]
    assert ("was slower than dense at every length measured" in lines[0]) != ("first beats dense at" in lines[0])
    import json

    record = json.loads((tmp_path / "s.json").read_text())["outputs"][0]
    assert 0 < record["attention_share"] < 1 and record["pays_measured"]
    first = record["sparse_pays_from"]
    assert first is None or f"first beats dense at {first // 1024}k tokens" in lines[0]
