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
    cpu, counts = torch.device("cpu"), {"dense": 9, "cache": 7, "sparse": 14}
    rows = [(1040, 0.03, 0.07, 0.03), (2048, 0.03, 0.06, 0.02), (4096, 0.12, 0.2, 0.07)]
    text = breakeven.line((0.123, "dense"), 1040, 4096, rows, cpu, 0.125, counts)
    assert text == ("rettn here: attention is 12% of a dense step at 1,040 tokens; on this CPU the attention of its "
                    "7 cache + 14 sparse steps (keep 0.125) first costs less than dense at 4k tokens (more at "
                    "1,040-2k), so sparsity does not pay at this run's 1,040 tokens")
    never = breakeven.line(None, 1040, None, rows[:2], cpu, 0.125, counts, 0.2036)
    assert "(keep 0.125, counted density 0.204) costs more" in never
    assert never.endswith("costs more than dense at every length measured (1,040-2k tokens), so sparsity does not pay here")
    assert breakeven.line((0.5, "dense"), 8192, 8192, [(8192, 1.0, 1.5, 0.2)], cpu, 0.1, counts).endswith(
        "first costs less than dense at 8k tokens, so sparse attention pays at this run's length")


def test_run_pays_weighs_cache_and_sparse_steps_against_dense():
    counts = {"dense": 9, "cache": 7, "sparse": 14}
    assert breakeven.run_pays({"dense": 32.0, "cache": 69.0, "sparse": 30.0}, counts) is False  # 903 > 672
    assert breakeven.run_pays({"dense": 32.0, "cache": 40.0, "sparse": 10.0}, counts) is True  # 420 < 672
    assert breakeven.run_pays({"cache": 1.0, "sparse": 1.0}, counts) is None  # no dense step to compare with
    assert breakeven.lengths_from(1040) == [2048, 4096, 8192, 16384] and breakeven.lengths_from(5000, 8192) == [8192]


def test_pays_from_measures_the_public_ops():
    first, rows = breakeven.pays_from(1, 2, 32, torch.float32, torch.device("cpu"), 0.25, 32, (256, 512),
                                      n_cache=1, n_sparse=2, budget_s=30.0)
    assert [n for n, *_ in rows] == ([256, 512] if first != 256 else [256])
    assert all(d > 0 and c > 0 and s > 0 for _, d, c, s in rows)
    if first is not None:
        _, d, c, s = rows[-1]
        assert c + 2 * s < 3 * d
    never, rows = breakeven.pays_from(1, 2, 32, torch.float32, torch.device("cpu"), 0.25, 32, (256, 512),
                                      n_cache=1, n_sparse=0, budget_s=30.0)  # a cache step alone never pays
    assert never is None and len(rows) == 2


def test_generate_compare_prints_the_pays_line(tmp_path, capsys):
    from rettn.tools.cli import main

    code = main(["generate", "--prompt", "a red circle moving right", "--compare", "--steps", "6", "--no-progress",
                 "--out", str(tmp_path / "c.gif"), "--json", str(tmp_path / "s.json")])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = [ln for ln in out.splitlines() if ln.startswith("rettn here: ")]
    assert len(lines) == 1, out
    assert re.search(r"attention is \d+% of a dense step at 1,040 tokens; on this CPU the attention of its "
                     r"\d+ cache \+ \d+ sparse steps \(keep 0\.125, counted density 0\.\d{3}\) ", lines[0]), lines[0]
    assert ("costs more than dense at every length measured" in lines[0]) != ("first costs less" in lines[0])
    import json

    record = json.loads((tmp_path / "s.json").read_text())["outputs"][0]
    assert 0 < record["attention_share"] < 1 and record["pays_measured"][0]["tokens"] == 1040
    first = record["sparse_pays_from"]
    assert first is None or f"first costs less than dense at {breakeven.short_tokens(first)} tokens" in lines[0]


def test_meter_and_fallback_under_torch_compile(monkeypatch):
    """The decisions run inside rettn::attend (eager Python under torch.compile): the meter times
    there, and the fallback switches the compiled calls to dense without a recompile per step."""
    torch._dynamo.reset()
    q, k, v = qkv(1, 2, 256, 32, seed=6)
    eng = make(fallback=True)
    fake_clock(monkeypatch, eng, dense_s=0.001, sparse_s=0.004)
    info = CallInfo(kind="self", slot=eng.slot(0))
    f = torch.compile(lambda q, k, v: eng.attend(q, k, v, 32 ** -0.5, info), backend="aot_eager", fullgraph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(STEPS):
            eng.on_forward(1000.0 - 50 * step)
            out = f(q, k, v)
    assert sum(issubclass(w.category, SlowerThanDenseWarning) for w in caught) == 1
    stats = eng.stats()
    assert [c.shape for c in stats.slower_shapes] == [(1, 2, 256, 32)]
    assert [r.sparse_calls for r in stats.steps[4:10]] == [1] * 6
    assert all(r.dense_reasons == {SLOWER: 1} for r in stats.steps[10:])
    torch.testing.assert_close(out, rettn.attention_with_lse(q, k, v)[0], atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


def test_command_line_shows_rettns_warnings_as_one_line(capsys, monkeypatch):
    from rettn.tools import cli

    def handler(args):
        warnings.warn("rettn: at attention shape (1, 2, 3, 4) on cpu, a sparse step's\n attention call took more",
                      SlowerThanDenseWarning)
        return 0

    monkeypatch.setattr(cli, "build_parser", lambda: type("P", (), {"parse_args": lambda self, argv: type(
        "A", (), {"handler": staticmethod(handler)})()})())
    assert cli.main([]) == 0
    err = capsys.readouterr().err
    assert err == "rettn: at attention shape (1, 2, 3, 4) on cpu, a sparse step's attention call took more\n"
    assert warnings.showwarning.__module__ == "warnings"  # put back after the command


def test_generate_compare_without_dense_steps_measures_the_runs_length_with_the_ops(tmp_path, capsys):
    """No dense step in the run to weigh against: the ops are timed at the run's own length too."""
    import json

    from rettn.tools.cli import main

    code = main(["generate", "--prompt", "a blue square moving up", "--compare", "--steps", "3", "--warmup", "0",
                 "--no-progress", "--out", str(tmp_path / "c.gif"), "--json", str(tmp_path / "s.json")])
    out, err = capsys.readouterr()
    assert code == 0, err
    record = json.loads((tmp_path / "s.json").read_text())["outputs"][0]
    measured = record["pays_measured"]
    assert measured[0]["tokens"] == 1040 and measured[0]["per"] == "attention call (ops)"
    assert all(m["dense_s"] > 0 for m in measured)
    line = [ln for ln in out.splitlines() if ln.startswith("rettn here: ")]
    assert len(line) == 1 and "a rettn step" in line[0], out
