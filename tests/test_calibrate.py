"""rettn calibrate: the probe's errors, the search, the cost models, fp8 residuals, preset files,
and the whole calibration on the embedded model."""

import json
import math

import numpy as np
import pytest
import torch
import yaml
from helpers import qkv

import rettn
from rettn.core.config import RettnConfig, load_preset
from rettn.core.engine import CallInfo, Engine
from rettn.core.residual import dequantize_fp8, quantize_fp8
from rettn.core.state import entry_bytes
from rettn.errors import ConfigError, UsageError
from rettn.ops.attention import attention_with_lse, cache_step_attention, sparse_step_attention
from rettn.tools.calibrate import calibrate
from rettn.tools.calibrate.cost import CostModel, flops_costs
from rettn.tools.calibrate.probe import StatsProbe
from rettn.tools.calibrate.search import Candidate, Scored, bisect_frontier, candidates, frontier, score
from rettn.tools.cli import main


# ------------------------------------------------------------------------------ the probe
def _probe_two_steps(ramp=0.04):
    config = RettnConfig(keep=0.25, block_size=32, warmup=0, refresh_interval=3, min_seq_len=0, ramp=ramp)
    eng = Engine(config, n_layers=1, family="test")
    probe = StatsProbe(eng, keeps=(0.25,), max_age=3, ramp=ramp)
    q1, k1, v1 = qkv(1, 2, 256, 32, seed=1)
    noise = qkv(1, 2, 256, 32, seed=2)
    steps = [(q1, k1, v1)]
    for i in (1, 2):  # later steps: the inputs drift
        steps.append(tuple(x + 0.15 * i * n for x, n in zip(steps[0], noise)))
    info = CallInfo(layer=0, kind="self", slot=eng.slot(0))
    for i, (q, k, v) in enumerate(steps):
        eng.step = i
        probe.on_call(q, k, v, 32 ** -0.5, info)
    return eng, probe, steps, info


def test_probe_errors_are_what_a_sparse_step_with_old_statistics_gives():
    eng, probe, steps, info = _probe_two_steps()
    (q1, k1, v1), _, (q3, k3, v3) = steps
    layout = eng.layout(q1, k1, info, 0.25)
    _, rho, residual, _ = cache_step_attention(q1, k1, v1, layout, scale=32 ** -0.5)
    rho2 = rho + 0.04  # the second sparse step after the cache step: one ramp on
    out, _, _ = sparse_step_attention(q3, k3, v3, layout, rho2, residual, scale=32 ** -0.5)
    dense, _ = attention_with_lse(q3, k3, v3)
    expected = float((out - dense).norm() / dense.norm())
    table = probe.table()
    assert table[(0, 2, 0.25, 2, "native")] == pytest.approx(expected, rel=1e-4)
    # older statistics are worse than fresh ones; the statistics beat plain sparse attention
    assert table[(0, 2, 0.25, 2, "native")] > table[(0, 2, 0.25, 1, "native")]
    assert table[(0, 1, 0.25, 1, "native")] < sum(probe.plain[(0, 1, 0.25)])
    # fp8 R costs little; no R costs more
    assert abs(table[(0, 1, 0.25, 1, "float8_e4m3fn")] - table[(0, 1, 0.25, 1, "native")]) < 0.01
    assert table[(0, 1, 0.25, 1, "none")] > table[(0, 1, 0.25, 1, "native")]
    assert set(probe.shapes[0].values()) == {((1, 2, 256, 32), torch.float32)}
    assert probe.entry_bytes(0, "native") == 2 * 256 * (4 + 32 * 4)
    assert probe.entry_bytes(0, "float8_e4m3fn") == 2 * 256 * (4 + 32 + 4)
    assert probe.entry_bytes(0, "none") == 2 * 256 * 4


# ------------------------------------------------------------------------------ the search
def _scored(cost, error):
    return Scored(Candidate(0, 2, 0, 0.1), {}, error, error, (), 0, cost=cost)


def test_frontier_keeps_only_candidates_better_than_every_cheaper_one():
    pts = [_scored(c, e) for c, e in [(5, 0.1), (3, 0.3), (4, 0.35), (4, 0.2), (6, 0.15), (2, 0.5), (7, 0.05)]]
    front = frontier(pts)
    assert [(s.cost, s.error) for s in front] == [(2, 0.5), (3, 0.3), (4, 0.2), (5, 0.1), (7, 0.05)]


@pytest.mark.parametrize("first_hold", [0, 3, 9, 10])
def test_bisection_finds_the_cheapest_that_holds_in_log_runs(first_hold):
    front = [_scored(i, 1.0 - i / 10) for i in range(10)]
    best, ran, cut = bisect_frontier(front, lambda s: s.cost >= first_hold, max_runs=10)
    assert (best.cost if best else None) == (first_hold if first_hold < 10 else None)
    assert len(ran) <= math.ceil(math.log2(11)) and not cut
    best, ran, cut = bisect_frontier(front, lambda s: s.cost >= first_hold, max_runs=1)
    assert len(ran) == 1 and cut


def test_score_counts_steps_drops_worst_layers_and_needs_every_age():
    # layer 1 is ten times worse than layer 0 at every sparse step
    table = {(layer, s, 0.1, a, "native"): (0.01 if layer == 0 else 0.1) * a
             for layer in (0, 1) for s in range(10) for a in (1, 2)}
    c = Candidate(warmup=2, interval=3, final=2, keep=0.1)
    s = score(c, table, [0, 1], 10, lambda layer, r: 100)
    assert s.counts == {"dense": 4, "cache": 2, "sparse": 4}  # D D C S S C S S D D
    assert s.error == pytest.approx((0.01 + 0.1) * (1 + 2) * 2 / 20)  # ages 1 and 2, twice, 2 layers
    d = score(Candidate(2, 3, 2, 0.1, n_dense_layers=1), table, [0, 1], 10, lambda layer, r: 100)
    assert d.dense_layers == (1,) and d.error == pytest.approx(0.01 * 3 * 2 / 20) and d.cache_bytes == 100
    assert score(Candidate(2, 4, 2, 0.1), table, [0, 1], 10, lambda layer, r: 0) is None  # age 3 unmeasured
    grid = list(candidates(10, (0.1,), (2, 3), (0.0, 0.2), (0.0,), ("cache", "step"), ("native", "none"), 1))
    assert not any(c.reselect == "step" and c.residual != "native" for c in grid)
    assert len(grid) == len(set(grid)) == 2 * 2 * 3 * 2


def test_fit_budget_downgrades_the_cheapest_error_per_byte_first():
    from rettn.tools.calibrate.search import fit_budget

    # layer 0 loses little without R, layer 1 a lot; fp8 costs nearly nothing for both
    err = {"native": {0: 0.01, 1: 0.01}, "float8_e4m3fn": {0: 0.011, 1: 0.011}, "none": {0: 0.02, 1: 0.5}}
    table = {(layer, s, 0.1, 1, form): e[layer] for form, e in err.items() for layer in (0, 1) for s in range(4)}
    nbytes = {"native": 100, "float8_e4m3fn": 40, "none": 10}
    c = Candidate(0, 2, 0, 0.1)
    s = score(c, table, [0, 1], 4, lambda layer, r: nbytes[r])
    assert s.cache_bytes == 200
    assert fit_budget(s, table, [0, 1], 4, lambda layer, r: nbytes[r], 200, ("native", "float8_e4m3fn", "none")) \
        .layer_residual == {}
    fp8 = fit_budget(s, table, [0, 1], 4, lambda layer, r: nbytes[r], 80, ("native", "float8_e4m3fn", "none"))
    assert fp8.layer_residual == {0: "float8_e4m3fn", 1: "float8_e4m3fn"} and fp8.cache_bytes == 80
    tight = fit_budget(s, table, [0, 1], 4, lambda layer, r: nbytes[r], 50, ("native", "float8_e4m3fn", "none"))
    assert tight.layer_residual == {0: "none", 1: "float8_e4m3fn"} and tight.cache_bytes == 50
    assert tight.error > fp8.error > s.error
    assert fit_budget(s, table, [0, 1], 4, lambda layer, r: nbytes[r], 19, ("native", "float8_e4m3fn", "none")) is None
    assert fit_budget(s, table, [0, 1], 4, lambda layer, r: nbytes[r], 110, ("native", "none")).layer_residual == {0: "none"}


def test_engine_keeps_r_per_layer():
    q, k, v = qkv(1, 2, 256, 32, seed=4)
    config = RettnConfig(keep=0.25, block_size=32, warmup=0, refresh_interval=3, min_seq_len=0,
                         layer_residual={1: "none", 2: "float8_e4m3fn"})
    eng = Engine(config, n_layers=3, family="test")
    eng.on_forward(900.0)
    for layer in range(3):
        eng.attend(q, k, v, 32 ** -0.5, CallInfo(layer=layer, kind="self"))
    entries = {layer: eng.slot(layer).entries[(0, None)] for layer in range(3)}
    assert entries[0].residual.dtype == q.dtype and entries[0].residual_scale is None
    assert entries[1].residual is None and entries[1].rho is not None
    assert entries[2].residual.dtype == torch.float8_e4m3fn and entries[2].residual_scale is not None
    assert eng.cached_bytes == sum(entry_bytes(config, q, config.layer_residual.get(i)) for i in range(3))
    with pytest.raises(ConfigError, match="layer_residual"):
        RettnConfig(layer_residual={0: "bf8"})


# ------------------------------------------------------------------------------ cost models
def test_flops_cost_model_of_cogvideox_2b():
    m = flops_costs("cogvideox-2b", (0.03125, 0.0625), 128)
    assert 0.55 < m.attention_share < 0.65  # ~61% of a dense step's FLOPs (docs/profiling.md)
    assert m.sparse[0.03125] < m.sparse[0.0625] < 1 < m.cache[0.03125] < m.cache[0.0625] < 1.15
    # the paper's schedule (15 dense, 7 cache, 28 sparse of 50) caps the run near 1.5x
    assert 1.3 < m.speedup({"dense": 15, "cache": 7, "sparse": 28}, 0.0625) < 1.6
    with pytest.raises(UsageError, match="unknown --target"):
        flops_costs("nope", (0.1,), 128)


def test_cost_model_arithmetic():
    m = CostModel("x", cache={0.1: 1.2}, sparse={0.1: 0.5})
    assert m.run({"dense": 2, "cache": 1, "sparse": 4}, 0.1) == pytest.approx(2 + 1.2 + 2.0)
    assert m.run({"sparse": 2}, 0.1, dense_fraction=0.5) == pytest.approx(2 * 0.75)
    assert m.speedup({"sparse": 2}, 0.1) == pytest.approx(2.0)  # 2 dense steps for the cost of 1


# ------------------------------------------------------------------------------ fp8 residuals
def test_fp8_residual_round_trip_and_engine():
    r = torch.randn(2, 3, 50, 32) * torch.logspace(-3, 1, 50)[None, None, :, None]
    data, scale = quantize_fp8(r)
    assert data.dtype == torch.float8_e4m3fn and scale.shape == (2, 3, 50, 1)
    back = dequantize_fp8(data, scale, torch.float32)
    assert ((back - r).norm(dim=-1) / r.norm(dim=-1)).max() < 0.07  # 3 mantissa bits, per-row scale
    assert torch.equal(dequantize_fp8(*quantize_fp8(torch.zeros(1, 4)), torch.float32), torch.zeros(1, 4))

    q, k, v = qkv(1, 2, 256, 32, seed=3)
    outs, sizes = {}, {}
    for dtype in (None, "float8_e4m3fn"):
        eng = Engine(RettnConfig(keep=0.25, block_size=32, warmup=0, refresh_interval=3, min_seq_len=0,
                                 residual_dtype=dtype), n_layers=1, family="test")
        for t in (900.0, 800.0):
            eng.on_forward(t)
            out = eng.attend(q, k, v, 32 ** -0.5, CallInfo(layer=0, kind="self"))
        outs[dtype], sizes[dtype] = out, eng.cached_bytes
    dense, _ = attention_with_lse(q, k, v)
    # same inputs: the cached R restores dense, exactly in the attention's dtype, to fp8's precision in fp8
    assert (outs[None] - dense).norm() / dense.norm() < 1e-4
    assert (outs["float8_e4m3fn"] - dense).norm() / dense.norm() < 0.03
    assert sizes["float8_e4m3fn"] < 0.4 * sizes[None]


# ------------------------------------------------------------------------------ preset files
def test_preset_file_loads_by_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"family": "cogvideox", "config": {"keep": 0.05, "warmup": 3}}))
    assert RettnConfig.from_preset(str(path)).keep == 0.05
    assert RettnConfig.from_preset(path, block_size=16).block_size == 16
    with pytest.raises(ConfigError, match="cannot read preset file"):
        load_preset(str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("config: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_preset(str(tmp_path / "bad.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_preset(str(tmp_path / "list.yaml"))


# ------------------------------------------------------------------------------ end to end
SMALL = dict(steps=8, keeps=(0.0625,), intervals=(2, 3), warmups=(0.25,), finals=(0.0,), reselects=("cache",),
             residuals=("native", "none"), max_dense_layers=1, progress=False)


@pytest.fixture(scope="module")
def pipe():
    from rettn.tiny import load_default_pipeline

    p = load_default_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


def _generate(pipe, prompt, seed=0, steps=8):
    out = pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="np")
    return np.asarray(out.frames[0], dtype=np.float32)


def test_calibrate_embedded_model_writes_a_preset_that_reproduces(pipe, tmp_path):
    from rettn.tools.metrics import psnr

    prompt = "a red circle moving right"
    result = rettn.calibrate(pipe, [prompt], (0,), floor_psnr=20.0, target="cogvideox-2b", **SMALL)
    assert result.chosen is not None and result.chosen.confirmed["holds"]
    assert result.chosen.confirmed["psnr_min"] >= 20.0
    assert result.base_preset == "tiny-shapes" and result.hand is not None and result.hand.confirmed
    assert set(result.costs) == {"measured", "flops"} and result.settings["ranked_by"].startswith("FLOPs")
    assert all(s.cost < 8 for s in result.confirmed)
    written = result.write(tmp_path / "cal.yaml")
    assert written[:2] == [str(tmp_path / "cal.yaml"), str(tmp_path / "cal.json")]
    assert (tmp_path / "cal.png").exists()
    report = json.loads((tmp_path / "cal.json").read_text())
    assert report["chosen"]["label"] == result.chosen.candidate.label() and report["candidates"]
    # the preset file gives the same config, and generating with it gives the confirmed PSNR
    config = RettnConfig.from_preset(str(tmp_path / "cal.yaml"))
    assert config == result.config
    handle = rettn.apply_rettention(pipe, preset=str(tmp_path / "cal.yaml"))
    try:
        out = _generate(pipe, prompt)
        counts = handle.stats().counts()
    finally:
        handle.remove()
    assert counts["sparse"] > 0
    assert psnr(_generate(pipe, prompt), out) == pytest.approx(result.chosen.confirmed["psnr_min"], abs=1e-6)


def _fixed_costs(sparse):
    def measured(pipe, base, keeps, call_kwargs, seed=0, steps=7, progress=None):
        return CostModel("fixed (test)", {k: 1.1 for k in keeps}, {k: sparse for k in keeps}, None, 1.0)
    return measured


def test_calibrate_reports_when_nothing_holds_and_honours_the_memory_budget(pipe, tmp_path, monkeypatch):
    monkeypatch.setattr("rettn.tools.calibrate.measured_costs", _fixed_costs(0.5))  # timing is tested above
    result = calibrate(pipe, ["a blue square moving up"], (0,), floor_psnr=200.0, **SMALL)
    assert result.chosen is None and result.config is None
    assert any("no candidate held" in n for n in result.notes)
    assert result.confirmed and not any(s.confirmed["holds"] for s in result.confirmed)
    written = result.write(tmp_path / "none.yaml")
    assert not (tmp_path / "none.yaml").exists() and str(tmp_path / "none.json") in written
    # a budget below R's bytes leaves only rho-only plans (or fewer cached layers)
    full = calibrate(pipe, ["a blue square moving up"], (0,), floor_psnr=0.0, max_confirm=1, **SMALL)
    rho_only = min(s.cache_bytes for s in full.scored if s.candidate.residual == "none")
    native = min(s.cache_bytes for s in full.scored if s.candidate.residual == "native")
    assert rho_only < native
    tight = calibrate(pipe, ["a blue square moving up"], (0,), floor_psnr=0.0, max_confirm=1,
                      max_cache_bytes=native - 1, **SMALL)
    assert tight.scored and all(s.cache_bytes < native for s in tight.scored)
    assert all(s.candidate.residual in ("none", "per-layer") or s.dense_layers for s in tight.scored)
    per_layer = [s for s in tight.scored if s.candidate.residual == "per-layer"]
    assert per_layer and all(s.layer_residual and set(s.layer_residual.values()) <= {"none"} for s in per_layer)
    assert per_layer[0].config(RettnConfig()).layer_residual == per_layer[0].layer_residual


def test_calibrate_keeps_attention_dense_where_sparse_does_not_pay(pipe, tmp_path, monkeypatch):
    monkeypatch.setattr("rettn.tools.calibrate.measured_costs", _fixed_costs(1.3))
    result = calibrate(pipe, ["a blue square moving up"], (0,), floor_psnr=10.0, **SMALL)
    assert not result.sparse_pays and result.chosen is None and not result.confirmed
    assert any("no candidate is predicted faster than dense" in n for n in result.notes)
    assert result.config.min_seq_len == 1041  # 1,024 video + 16 text tokens: every layer stays dense, said so
    result.write(tmp_path / "dense.yaml")
    assert "faster than dense" in load_preset(str(tmp_path / "dense.yaml"))["notes"]


def test_calibrate_rejects_bad_options_before_running(pipe):
    with pytest.raises(ConfigError, match="keeps"):
        calibrate(pipe, ["x"], keeps=(0.0,))
    with pytest.raises(ValueError, match="prompts"):
        calibrate(pipe, "a prompt, not a list")
    with pytest.raises(ConfigError, match="residuals"):
        calibrate(pipe, ["x"], residuals=("bf8",))
    with pytest.raises(ConfigError, match="rettn calibrate searches fixed schedules"):
        calibrate(pipe, ["x"], config=RettnConfig(warmup="auto", refresh_interval="auto"))


def test_cli_calibrate_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert main(["calibrate", "--out", str(tmp_path / "x.txt")]) == 2
    assert "--out must name a .yaml file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a value out of range: the parser's one line
        main(["calibrate", "--keeps", "2", "--out", str(tmp_path / "x.yaml")])
    assert e.value.code == 2 and "argument --keeps: expected a fraction in (0, 1], got '2'" in capsys.readouterr().err
    assert main(["calibrate", "--target", "nope", "--out", str(tmp_path / "x.yaml")]) == 2
    assert "unknown --target" in capsys.readouterr().err
