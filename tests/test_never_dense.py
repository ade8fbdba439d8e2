"""Never silently dense (issue 20, item 3): a schedule that resolves to no sparse step warns once
per step count and schedule (ScheduleWarning, naming the steps, the resolved counts and what to
change) and stats() says so; a normal schedule does not. Step tracking follows the direction the
caller's timesteps actually run (a bare Mochi driven with falling timesteps counts its steps)."""

import re
import warnings

import pytest
import torch
from tiny_models import tiny_inputs, tiny_transformer

import rettn
from rettn.core.config import RettnConfig
from rettn.core.engine import Engine
from rettn.core.stats import schedule_problem
from rettn.core.tracking import StepTracker
from rettn.errors import RettnWarning, ScheduleWarning

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def schedule_warnings(caught):
    return [str(w.message) for w in caught if issubclass(w.category, ScheduleWarning)]


def counts(kinds):
    return {k: kinds.count(k) for k in ("dense", "cache", "sparse")}


@pytest.mark.parametrize("steps", [4, 8])
def test_few_step_schedules_of_presets_are_named_with_a_fix_that_works(steps):
    cfg = RettnConfig.from_preset("cogvideox-2b")
    kinds = cfg.schedule(steps).kinds(steps)
    assert counts(kinds)["sparse"] == 0  # the preset's fractions leave no sparse step here
    note = schedule_problem(cfg, kinds, steps)
    c = counts(kinds)
    assert f"this {steps}-step generation resolves to {c['dense']} dense, {c['cache']} cache and 0 sparse" in note
    assert "refresh_interval=0.1" in note and "a cache step every step after warm-up" in note
    w, r = (int(x) for x in re.search(r"e\.g\. warmup=(\d+), refresh_interval=(\d+)", note).groups())
    fixed = cfg.replace(warmup=w, refresh_interval=r).schedule(steps).kinds(steps)
    assert counts(fixed)["sparse"] > 0 and f"{counts(fixed)['sparse']} sparse steps at {steps} steps" in note


def test_normal_schedules_have_no_note():
    for preset in ("cogvideox-2b", "hunyuanvideo", "wan2.2", "flux"):
        cfg = RettnConfig.from_preset(preset)
        assert schedule_problem(cfg, cfg.schedule(50).kinds(50), 50) is None
    cfg = RettnConfig(warmup=3, refresh_interval=5)
    assert schedule_problem(cfg, cfg.schedule(10).kinds(10), 10) is None
    one = RettnConfig(warmup=0, refresh_interval=2)
    assert "leave no room" in schedule_problem(one, one.schedule(1).kinds(1), 1)


def test_engine_warns_once_per_step_count_and_stats_say_so():
    eng = Engine(RettnConfig.from_preset("cogvideox-2b"), n_layers=1, family="test")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for gen in range(2):  # two 4-step generations: one warning
            for step in range(4):
                eng.begin_forward(step, 0, step == 0, num_steps=4)
        first = schedule_warnings(caught)
        stats = eng.stats()
        for step in range(8):  # another step count: warned again
            eng.begin_forward(step, 0, step == 0, num_steps=8)
        second = schedule_warnings(caught)[len(first):]
        for step in range(50):  # the preset's own step count: no warning, no note
            eng.begin_forward(step, 0, step == 0, num_steps=50)
        fifty = eng.stats()
    assert len(first) == 1 and "4-step" in first[0] and "1 dense, 3 cache and 0 sparse" in first[0]
    assert stats.schedule_warning == first[0] and "NO SPARSE STEP" in str(stats)
    assert len(second) == 1 and "8-step" in second[0]
    assert len(schedule_warnings(caught)) == 2
    assert fifty.schedule_warning is None and "NO SPARSE STEP" not in str(fifty)
    assert fifty.counts() == {"dense": 15, "cache": 7, "sparse": 28}


@torch.no_grad()
def test_bare_transformer_ten_steps_of_the_preset_warns_once():
    model = tiny_transformer("cogvideox")
    handle = rettn.apply_rettention(model, keep=0.25, block_size=32, min_seq_len=0)  # cogvideox-2b preset
    assert handle.preset == "cogvideox-2b" and handle.config.refresh_interval == 0.1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for gen in range(2):
            for i in range(10):
                model(**tiny_inputs("cogvideox", model, batch=1, t=999.0 - 100 * i))
            stats = handle.stats()
    handle.remove()
    found = schedule_warnings(caught)
    assert len(found) == 1, found
    assert issubclass(ScheduleWarning, RettnWarning)
    assert "0 sparse" in found[0] and "a cache step every step after warm-up" in found[0]
    assert "set_num_inference_steps" in found[0] and "refresh_interval as a step count" in found[0]
    assert stats.counts()["sparse"] == 0 and stats.counts()["cache"] >= 6
    assert stats.schedule_warning and "10 steps seen" in stats.schedule_warning
    assert "schedule: NO SPARSE STEP" in str(stats)


@torch.no_grad()
def test_bare_transformer_with_sparse_steps_does_not_warn():
    model = tiny_transformer("cogvideox")
    handle = rettn.apply_rettention(model, keep=0.25, block_size=32, min_seq_len=0, warmup=2, refresh_interval=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(6):
            model(**tiny_inputs("cogvideox", model, batch=1, t=999.0 - 100 * i))
        stats = handle.stats()
    handle.remove()
    assert schedule_warnings(caught) == [] and stats.schedule_warning is None
    assert stats.kinds() == ["dense", "dense", "cache", "sparse", "sparse", "cache"]


# ------------------------------------------------------------------------------ step tracking
def test_tracker_follows_the_callers_direction_on_the_first_move():
    tr = StepTracker(rising=True)  # Mochi's convention, driven with falling timesteps
    seen = [(tr.on_forward(t), tr.step) for t in (950.0, 850.0, 850.0, 700.0)]
    assert seen == [(True, 0), (False, 1), (False, 1), (False, 2)] and tr.flipped and not tr.rising
    assert tr.on_forward(999.0) and tr.generations == 2  # settled: going back up is a new generation
    tr.reset()
    assert tr.rising and not tr.flipped
    falling = StepTracker()
    assert [falling.on_forward(t) for t in (900.0, 800.0, 950.0)] == [True, False, True]
    assert not falling.flipped


@pytest.mark.parametrize("convention", ["pipeline (1000 - t, rising)", "falling"])
@torch.no_grad()
def test_bare_mochi_counts_six_steps(convention):
    model = tiny_transformer("mochi")
    handle = rettn.apply_rettention(model, keep=0.25, block_size=32, min_seq_len=0, warmup=2, refresh_interval=3)
    for t in (950.0, 850.0, 700.0, 600.0, 450.0, 300.0):
        inputs = tiny_inputs("mochi", model, batch=1, t=t)
        if convention == "falling":
            inputs["timestep"] = torch.full_like(inputs["timestep"], t)
        model(**inputs)
    stats = handle.stats()
    handle.remove()
    assert stats.generations == 1 and len(stats.steps) == 6
    assert stats.kinds() == ["dense", "dense", "cache", "sparse", "sparse", "cache"]


def test_docs_errors_md_quotes_the_message():
    from pathlib import Path

    cfg = RettnConfig.from_preset("cogvideox-2b")
    note = schedule_problem(cfg, cfg.schedule(4).kinds(4), 4)
    assert f"`{note}`" in (Path(__file__).resolve().parents[1] / "docs" / "errors.md").read_text()
