"""The adaptive schedule (warmup / refresh_interval "auto", rettn.core.adaptive): its config
checks, its rules on given errors, the staleness it measures against a torch reference, and
that it runs with CFG split, two transformers, offloaded R and torch.compile, deterministically."""


import pytest
import torch
import torch.nn.functional as F
from helpers import qkv
from tiny_models import tiny_inputs, tiny_pipeline, tiny_pipeline_kwargs, tiny_transformer

import rettn
from rettn.core.adaptive import AutoSchedule
from rettn.core.config import RettnConfig
from rettn.core.engine import CallInfo, Engine
from rettn.errors import ConfigError, ScheduleWarning
from rettn.ops.reference import block_sparse_reference

AUTO = dict(warmup="auto", refresh_interval="auto")


# ---------------------------------------------------------------------------- config
def test_auto_fields_and_default_tolerance():
    c = RettnConfig(warmup="Auto", refresh_interval=" auto ")
    assert (c.warmup, c.refresh_interval, c.tolerance, c.is_auto) == ("auto", "auto", 0.09, True)
    assert RettnConfig(refresh_interval="auto", tolerance=0.2).tolerance == 0.2
    assert not RettnConfig().is_auto and RettnConfig().tolerance is None
    fixed = c.replace(warmup=3, refresh_interval=4)  # fixing the schedule drops the tolerance
    assert fixed.tolerance is None and not fixed.is_auto
    assert c.replace(keep=0.5).tolerance == 0.09
    with pytest.raises(ConfigError, match="adaptive"):
        c.schedule(30)  # no fixed kinds to resolve


def test_a_preset_file_can_be_adaptive(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("family: cogvideox\nconfig:\n  keep: 0.125\n  warmup: auto\n  refresh_interval: auto\n"
                    "  tolerance: 0.2\n")
    c = RettnConfig.from_preset(str(path))
    assert (c.warmup, c.refresh_interval, c.tolerance) == ("auto", "auto", 0.2)
    assert RettnConfig.from_preset("tiny-shapes", warmup="auto").is_auto


@pytest.mark.parametrize("kw,match", [
    (dict(AUTO, tolerance=0), "tolerance must be a positive number"),
    (dict(AUTO, tolerance=-0.1), "tolerance must be a positive number"),
    (dict(AUTO, tolerance=float("nan")), "tolerance must be a positive number"),
    (dict(AUTO, tolerance=True), "tolerance must be a positive number"),
    (dict(AUTO, tolerance="0.1"), "tolerance must be a positive number"),
    (dict(tolerance=0.1), "tolerance=0.1 has no meaning without warmup='auto' or refresh_interval='auto'"),
    (dict(warmup="auto", refresh_interval=1), "refresh_interval=1 with warmup='auto' has no meaning"),
    (dict(warmup="auto", refresh_interval="100%"), "refresh_interval=1 with warmup='auto' has no meaning"),
    (dict(AUTO, use_rho=False, use_residual=False), "needs cached statistics"),
    (dict(dense_final="auto"), "dense_final must be a step count"),
    (dict(warmup="automatic"), "warmup must be a step count"),
])
def test_bad_auto_configs_name_the_field(kw, match):
    with pytest.raises(ConfigError, match=match):
        RettnConfig(**kw)


# ---------------------------------------------------------------------------- the rules
def drive(schedule, n, error):
    """Run ``schedule`` for ``n`` steps; ``error(step, age)`` is what each measured call reports."""
    kinds, last = [], None
    for step in range(n):
        kind = schedule.kind(step)
        kinds.append(kind)
        if kind == "cache":
            if last is not None:
                schedule.measure(0, torch.tensor(error(step, step - last)))
            last = step
    return "".join(k[0].upper() for k in kinds)


def test_warmup_waits_for_the_one_step_error_then_the_interval_follows_it():
    a = AutoSchedule(RettnConfig(**AUTO, tolerance=0.1), 50)
    # stale early (error 0.5 until step 9), then 0.03 per step of age: the longest interval whose
    # sparse steps' oldest statistics stay within 0.1 is 4 (3 steps old: 0.09), grown one step per refresh
    kinds = drive(a, 50, lambda s, age: 0.5 if s < 9 else 0.03 * age)
    assert kinds.startswith("DDDDD" + "CCCCC")  # the floor: 10% of 50 steps, then cache steps
    assert kinds[10:20] == "SCSSCSSSCS"  # settled at step 9: every 2, then 3, then 4
    assert a.settled_at == 9 and [r.interval for r in a.refreshes][:5] == [1, 1, 1, 2, 3]
    assert {r.interval for r in a.refreshes[6:]} == {4}
    assert all(r2.age == r2.step - r.step for r, r2 in zip(a.refreshes, a.refreshes[1:]))


def test_interval_grows_to_the_cap_and_shrinks_on_a_spike():
    a = AutoSchedule(RettnConfig(**AUTO, tolerance=0.1), 30)
    assert drive(a, 30, lambda s, age: 0.005 * age) == "DDDCCSCSSCSSSCSSSSCSSSSSCSSSSS"
    assert [r.interval for r in a.refreshes] == [2, 3, 4, 5, 6, 6]  # capped at 20% of 30 steps
    b = AutoSchedule(RettnConfig(**AUTO, tolerance=0.1), 30)
    kinds = drive(b, 30, lambda s, age: 0.5 if 13 <= s < 16 else 0.04 * age)
    spike = next(r for r in b.refreshes if r.error > 0.4)
    assert spike.interval == max(1, int(spike.age * 0.1 / 0.5) + 1) == 1  # shrunk: refreshed at the next step
    assert kinds[spike.step + 1] == "C" and "S" in kinds[16:]  # sparse again once the error is low


@pytest.mark.parametrize("n,expected", [(4, "DCCS"), (8, "DCCSCSCS"), (2, "DD")])
def test_few_steps(n, expected):
    """What docs/usage.md says about 4 and 8 steps (errors well under the tolerance)."""
    assert drive(AutoSchedule(RettnConfig(**AUTO), n), n, lambda s, age: 0.01) == expected


def test_fixed_warmup_or_interval_with_the_other_auto_and_dense_final():
    a = AutoSchedule(RettnConfig(warmup=3, refresh_interval="auto", dense_final=2), 12)
    assert drive(a, 12, lambda s, age: 0.01) == "DDDCSCSCSDDD"  # capped at 2 (20% of 12); no refresh right before the tail
    b = AutoSchedule(RettnConfig(warmup="auto", refresh_interval=3), 12)
    assert drive(b, 12, lambda s, age: 0.2 if s < 4 else 0.05) == "DCCCCSSCSSCS"
    assert AutoSchedule(RettnConfig(**AUTO), None).floor == 2  # no step count: 2 dense steps
    c = AutoSchedule(RettnConfig(warmup="auto", refresh_interval="5%"), 12)  # 5% of 12 rounds to 1 step
    assert drive(c, 12, lambda s, age: 0.01) == "DCCSCSCSCSCS"  # every 2 at least after the warm-up


def test_one_decision_per_step_from_every_call_measured():
    a = AutoSchedule(RettnConfig(**AUTO), 20)
    assert [a.kind(s) for s in range(3)] == ["dense", "dense", "cache"]
    for layer, e in enumerate([0.01, 0.05, 0.03]):  # the calls of one cache step
        a.measure(layer, torch.tensor(e))
    assert a.kind(3) == "sparse" and len(a.refreshes) == 1  # folded once, at the next step
    r = a.refreshes[0]
    assert (r.step, r.calls, r.worst_layer) == (2, 3, 1) and r.error == pytest.approx(0.03)
    assert a.kind(4) == "cache" and len(a.refreshes) == 1  # nothing measured: nothing decided


# ---------------------------------------------------------------------------- the measure
@pytest.mark.parametrize("heads,measured", [(2, [0, 1]), (8, [0, 2, 4, 6]), (30, [0, 8, 16, 24])])
def test_measured_error_is_the_stale_statistics_output_against_dense(heads, measured):
    """At a cache step the engine measures what the statistics it replaces give at this step:
    rho * (block-sparse attention on their blocks) + R, against dense attention (a float64 torch
    reference here), as a relative L2 error over 4 evenly spaced heads (all when fewer)."""
    eng = Engine(RettnConfig(keep=0.25, block_size=32, **AUTO, tolerance=10.0, ramp=0.05, min_seq_len=0,
                             num_inference_steps=10), n_layers=1, family="test")
    info = CallInfo(layer=0, kind="self")
    entries, errors = [], []
    for step in range(5):
        q, k, v = qkv(1, heads, 256, 32, seed=step)
        eng.on_forward(1000.0 - 100 * step)
        old = next(iter(eng.cache.values()), None)
        if old is not None:
            entries.append((old.layout, old.rho.clone(), old.residual.clone()))
        if eng.kind == "cache" and old is not None:
            layout, rho, res = entries[-1]
            pred = rho.double().unsqueeze(-1) * block_sparse_reference(
                q.double(), k.double(), v.double(), layout, compute_dtype=torch.float64)[0] + res
            ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
            errors.append(float((pred - ref)[:, measured].norm() / ref[:, measured].norm()))
        eng.attend(q, k, v, 32**-0.5, info)
    st = eng.stats()
    assert st.kinds() == ["dense", "cache", "cache", "sparse", "cache"]
    assert [r.step for r in st.refreshes] == [2, 4] and [r.age for r in st.refreshes] == [1, 2]
    # the ramp: the sparse step at 3 used rho, the measure at 4 uses rho + ramp (as step 5 would)
    assert torch.allclose(entries[-1][1], entries[-2][1] + 0.05)
    assert [r.error for r in st.refreshes] == pytest.approx(errors, rel=1e-4)
    assert "warm-up settled at step 2; 2 refresh(es) measured: error" in st.adaptive
    assert f"   4 | cache  |        1 |            1 |           0 | 0.2" in str(st)
    assert str(st).splitlines()[[i for i, x in enumerate(str(st).splitlines()) if x.startswith("   4 |")][0]].endswith(
        f"| 2-step-old: error {st.refreshes[1].error:.4f} (worst {st.refreshes[1].worst:.4f}, layer 0) -> every 2")


# ---------------------------------------------------------------------------- in pipelines
def _pipeline_run(family, steps, **config):
    pipe = tiny_pipeline(family, qk_gain=8.0)
    handle = rettn.apply_rettention(pipe, keep=0.25, block_size=32, min_seq_len=0, **config)
    try:
        out = pipe(**tiny_pipeline_kwargs(family, num_inference_steps=steps))
        return out, handle.stats(), str(handle.describe())
    finally:
        handle.remove()


def _refreshes(stats):
    return [(r.step, r.age, r.calls, round(r.error, 6)) for r in stats.refreshes]


def test_cfg_split_deterministic_and_offloaded_r_measure_the_same():
    """Wan calls the transformer twice a step (CFG split): both branches' calls are measured and
    decided on together. A second run gives the same steps and errors; with R offloaded to the
    host, the same too."""
    kw = dict(**AUTO, tolerance=0.5)
    _, a, desc = _pipeline_run("wan", 10, **kw)
    _, b, _ = _pipeline_run("wan", 10, **kw)
    _, c, _ = _pipeline_run("wan", 10, residual_device="cpu", **kw)
    _, d, _ = _pipeline_run("wan", 10, residual_dtype="float8_e4m3fn", **kw)  # R dequantized for the measure
    assert d.refreshes and [x[3] for x in _refreshes(d)] == pytest.approx([x[3] for x in _refreshes(a)], abs=0.02)
    assert "sparse" in a.kinds() and a.refreshes and a.adaptive in str(a)
    assert all(s.forwards == 2 for s in a.steps)
    layers = len({r.worst_layer for r in a.refreshes} | {0})
    assert all(r.calls >= 2 * 1 for r in a.refreshes) and layers >= 1
    assert a.kinds() == b.kinds() == c.kinds()
    assert _refreshes(a) == _refreshes(b)
    assert [x[3] for x in _refreshes(c)] == pytest.approx([x[3] for x in _refreshes(a)], rel=1e-5)
    assert "adaptive schedule" in desc


def test_two_transformers_refresh_when_the_second_takes_over():
    out, st, _ = _pipeline_run("wan2.2-a14b", 12, **AUTO, tolerance=0.5)
    switch = next(i for i, s in enumerate(st.steps) if 1 in s.models)
    assert st.steps[switch].kind == "cache" and "sparse" in st.kinds()[switch:]


def test_never_settling_warns_and_stats_say_so():
    with pytest.warns(ScheduleWarning, match="adaptive schedule ran 8 steps as 2 dense, 6 cache and 0 sparse"):
        _, st, _ = _pipeline_run("wan", 8, **AUTO, tolerance=1e-9)
    assert st.kinds() == ["dense"] + ["cache"] * 6 + ["dense"]  # the last step: nothing uses its statistics
    assert "never stayed under the tolerance" in st.schedule_warning and "never settled" in st.adaptive


def test_compiled_blocks_run_the_adaptive_schedule_without_recompiles():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny_transformer("cogvideox", 0, qk_gain=8.0, num_layers=2)
    inputs = tiny_inputs("cogvideox", model)
    handle = rettn.apply_rettention(model, keep=0.25, block_size=32, min_seq_len=0, **AUTO, tolerance=10.0,
                                    num_inference_steps=7)

    def run():
        with torch.no_grad():
            return [model(**{**inputs, "timestep": torch.full_like(inputs["timestep"], t)})[0]
                    for t in (900, 800, 700, 600, 500, 400, 300)]

    eager = run()
    kinds, errors = handle.stats().kinds(), _refreshes(handle.stats())
    assert kinds == ["dense", "cache", "cache", "sparse", "cache", "sparse", "dense"]
    for block in model.transformer_blocks:
        block.compile(backend="aot_eager", fullgraph=True)
    try:
        with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
            compiled = run()
        assert handle.stats().kinds() == kinds and not counters["graph_break"]
        assert [e[3] for e in _refreshes(handle.stats())] == pytest.approx([e[3] for e in errors], abs=1e-5)
        for a, b in zip(eager, compiled):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    finally:
        handle.remove()
        torch._dynamo.reset()


def test_generate_on_the_embedded_model_says_what_the_schedule_did(tmp_path, capsys):
    """The command line takes "auto" (bad values: tests/test_cli_checks.py's table) and prints
    the steps the adaptive schedule took and the errors it measured."""
    from rettn.tools.cli import main

    out = tmp_path / "clip.gif"
    code = main(["generate", "--prompt", "a red circle moving right", "--steps", "8", "--warmup", "auto",
                 "--refresh-interval", "auto", "--tolerance", "0.3", "--out", str(out), "--no-progress",
                 "--json", str(tmp_path / "run.json")])
    printed = capsys.readouterr().out
    assert code == 0 and out.exists()
    assert "clip.gif: DCC" in printed and "adaptive schedule (warmup='auto', refresh_interval='auto', " \
        "tolerance 0.3): 1 dense step(s) first" in printed
    import json

    record = json.loads((tmp_path / "run.json").read_text())["outputs"][0]
    assert record["schedule"].startswith("DCC") and record["refreshes"][0]["age"] == 1
    # a tolerance with the preset's fixed schedule: one line, exit 2 (known once the preset is)
    code = main(["generate", "--prompt", "x", "--steps", "2", "--tolerance", "0.2", "--no-progress",
                 "--out", str(tmp_path / "y.gif")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "tolerance=0.2 has no meaning without warmup='auto'" in err[0]


def test_heldout_script_tables_the_stored_measurement(tmp_path):
    """scripts/adaptive_heldout.py's table and chart from the run docs/quality.md reports."""
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    stored = root / "docs/measurements/2026-12-05-adaptive/adaptive.json"
    shutil.copy(stored, tmp_path / "adaptive.json")
    out = subprocess.run([sys.executable, str(root / "scripts/adaptive_heldout.py"), "--table",
                          str(tmp_path / "adaptive.json")], capture_output=True, text=True, check=True).stdout
    rows = json.loads(stored.read_text())["rows"]
    assert len({(r["prompt"], r["seed"]) for r in rows}) == 32  # 16 held-out captions x 2 seeds
    line = next(x for x in out.splitlines() if x.startswith("| adaptive, tolerance 0.09 |"))
    numbers = line.split("|", 2)[2]
    assert "| **adaptive, tolerance 0.09 (default)** |" + numbers in (root / "docs/quality.md").read_text()
    assert (tmp_path / "adaptive.png").stat().st_size > 10_000
