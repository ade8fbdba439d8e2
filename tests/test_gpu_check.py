"""The GPU check's rehearsal: ``scripts/gpu_check.sh --rehearse`` runs every step of the GPU
check on CPU (tiny shapes, the Triton interpreter) and must succeed with the summary the GPU
run writes, so that a broken step shows here and not in the GPU's short window."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check_summary  # noqa: E402

STEPS = {"install", "bench", "select", "tests", "profile", "compile", "long"}
TOP = {"mode", "complete", "ok", "budget_s", "elapsed_s", "env", "steps", "bench", "tests", "profile", "compile",
       "long", "kernels", "files", "targets"}
STEP = {"rc", "ok", "seconds", "cap_s", "timed_out", "ran"}
ENV = {"python", "torch", "triton", "diffusers", "cuda", "device_name", "capability"}
BENCH_ROW = {"seq", "keep", "density", "backend", "kv_blocks_per_row", "best_sdpa", "ms", "speedup_vs_sdpa",
             "speedup_vs_sdpa_with_select", "rescaled_speedup_vs_sdpa", "speedup_vs_flex", "flex_speedup_vs_sdpa",
             "dense_lse_vs_sdpa", "extra", "rettn_vs_flex_max_abs", "errors"}
BENCH_MS = {"sdpa", "sdpa_flash", "sdpa_cudnn", "flex", "flex_mask", "rettn", "rettn_lse", "rettn_rescaled",
            "dense_lse", "dense_lse_triton", "select"}
TESTS = {"passed", "failed", "skipped", "errors", "summary_line", "failures"}
PROFILE = set(gpu_check_summary.PROFILE_KEYS)
LONG_CASE = set(gpu_check_summary.LONG_CASE)
TARGET = {"name", "where", "value", "op", "bound", "met"}
COMPILE = {"median_s", "first_s", "ratios", "schedule", "layers", "seq"}
KERNEL_STEP = {"count", "compiled", "keys", "unmapped", "replay_errors"}


def _keys_match(summary):
    assert set(summary) == TOP
    assert set(summary["steps"]) == STEPS and all(set(s) == STEP for s in summary["steps"].values())
    assert set(summary["tests"]) == TESTS and set(summary["profile"]) == PROFILE
    assert set(summary["compile"]) == COMPILE
    assert set(summary["kernels"]) == {"per_step", "distinct", "keys"}
    assert set(summary["kernels"]["per_step"]) == STEPS
    assert all(set(s) == KERNEL_STEP for s in summary["kernels"]["per_step"].values())
    assert all(set(c) == LONG_CASE for c in summary["long"].values())
    assert summary["targets"] and all(set(t) == TARGET for t in summary["targets"])


def test_summary_of_a_gpu_run_that_produced_nothing_has_the_same_keys(tmp_path):
    """A GPU run cut off before any step: the summary still has every key (values null)."""
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    summary = gpu_check_summary.build(out, work, rehearse=False, budget=400, start=0)
    _keys_match(summary)
    assert summary["mode"] == "gpu" and not summary["ok"] and not summary["complete"]
    assert summary["long"] == {}
    assert all(t["value"] is None and t["met"] is None for t in summary["targets"])
    screen = gpu_check_summary.text(summary)
    assert "NOT all steps ok" in screen and "not measured" in screen


H200 = Path("/work/shared/measurements/2026-12-04-h200")  # the first GPU run's files, where present


def _profile_json(dense, rettn_dense, attention, cache, sparse, density, label="dense (no rettn)", baseline=None):
    rows = [{"label": label, "mean_s": dense},
            {"label": "rettn dense", "mean_s": rettn_dense, "attention_s": attention},
            {"label": "rettn cache", "mean_s": cache}, {"label": "rettn sparse", "mean_s": sparse, "attention_s": 0.04}]
    return {"summary": {"rows": rows, "run": {"dense_s": 31.3, "rettn_s": 23.4, "speedup": 31.3 / 23.4},
                        "mean_density": density},
            "target": {"seq_len": 17776, "batch": 2}, "steps": 50, "schedule": {"counts": {"dense": 15}},
            **({"dense_baseline": baseline} if baseline else {}),
            "kernels": {"skipped": "not measured yet (the run stopped before the kernel table)"}}


def test_profile_numbers_against_the_faster_dense_step():
    """The cache step and the sparse step's ceiling are measured against the faster of the dense
    baseline's step and rettn's own dense step; the ceiling cuts the dense step's attention to
    the counted density. A profile cut before its kernel table (no rows) still counts."""
    p = gpu_check_summary.profile_numbers(_profile_json(0.700, 0.600, 0.350, 0.630, 0.300, 0.0625,
                                                        baseline={"backend": "cudnn", "describe": "dense SDPA (cudnn)"}))
    assert p["reference_dense_step_ms"] == pytest.approx(600.0)
    assert p["cache_step_cost"] == pytest.approx(1.05)
    ceiling = 0.600 - 0.350 * (1 - 0.0625)
    assert p["sparse_step_ceiling_ms"] == pytest.approx(1e3 * ceiling)
    assert p["sparse_step_vs_ceiling"] == pytest.approx(ceiling / 0.300)
    assert p["dense_backend"] == "dense SDPA (cudnn)" and p["kernel_rows"] == [] and p["kernels_note"].startswith("not measured")
    # a relabelled baseline row (a newer profiler naming its backend) is still the baseline
    q = gpu_check_summary.profile_numbers(_profile_json(0.500, 0.600, 0.350, 0.630, 0.300, 0.0625, label="dense (cudnn)"))
    assert q["dense_step_ms"] == pytest.approx(500.0) and q["cache_step_cost"] == pytest.approx(0.630 / 0.500)


def test_targets_met_and_not_met(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    (out / "profile-cogvideox-2b.json").write_text(json.dumps(_profile_json(0.6, 0.6, 0.35, 0.62, 0.25, 0.0625)))
    (out / "bench_compile.json").write_text(json.dumps({"ratios": {"rettn speedup, compiled": 1.39}, "results": {}}))
    summary = gpu_check_summary.build(out, work, rehearse=False, budget=400, start=0)
    got = {(t["where"], t["name"]): t["met"] for t in summary["targets"]}
    assert got[("profile cogvideox-2b", "cache step vs dense step")] is True  # 1.033 <= 1.05
    assert got[("profile cogvideox-2b", "sparse step vs its ceiling")] is True  # 0.272 / 0.25
    assert got[("profile cogvideox-2b", "whole run speedup, eager")] is False  # 1.34 < 1.35
    assert got[("compile", "whole run speedup, compiled")] is False
    assert "NOT met" in gpu_check_summary.text(summary)


def test_long_step_partial_json(tmp_path):
    """profile-long.json as a cut run leaves it: HunyuanVideo's dense and rettn runs done, its
    offload run and Wan not: the summary has the numbers that exist and null for the rest."""
    steps = [{"kind": k, "seconds": s, "regions": {"attention": a}} for k, s, a in
             (("dense", 2.0, 1.7), ("cache", 2.05, 1.75), ("sparse", 0.45, 0.13), ("sparse", 0.45, 0.13))]
    runs = {"dense": {"total_s": 4.0, "steps": [{"kind": "dense", "seconds": 2.0}] * 2},
            "rettn": {"total_s": 4.95, "steps": steps, "mean_density": 0.07, "peak_memory_bytes": 2**31}}
    sys.path.insert(0, str(ROOT / "scripts"))
    import profile_long

    summ = profile_long.case_summary(runs, 4)
    assert summ["dense_run_s"] == pytest.approx(8.0) and summ["dense_run_extrapolated_from_steps"] == 2
    # rettn's own dense step faster than the baseline's: every ratio is against it, the run too
    faster = dict(runs, rettn=dict(runs["rettn"], steps=[dict(steps[0], seconds=1.8)] + steps[1:]))
    f = profile_long.case_summary(faster, 4)
    assert f["reference_dense"] == "rettn dense step" and f["cache_step_cost"] == pytest.approx(2.05 / 1.8)
    assert f["run_speedup"] == pytest.approx(8.0 * 0.9 / 4.95) and f["run_speedup_vs_baseline_run"] == pytest.approx(8.0 / 4.95)
    report = {"cases": {"hunyuanvideo": {"status": "timing rettn_offload", "offload": True, "summary": summ,
                                         "target": {"seq_len": 119056, "layers": "2+2+2"},
                                         "schedule": {"counts": {"dense": 1, "cache": 1, "sparse": 2}}},
                        "wan2.1-14b": {"status": "not started", "offload": False}}}
    (tmp_path / "profile-long.json").write_text(json.dumps(report))
    long = gpu_check_summary.long_numbers(gpu_check_summary._load(tmp_path / "profile-long.json"))
    h, w = long["hunyuanvideo"], long["wan2.1-14b"]
    assert h["cache_step_cost"] == pytest.approx(1.025) and h["run_speedup"] == pytest.approx(8.0 / 4.95)
    assert h["sparse_step_vs_ceiling"] == pytest.approx((2.0 - 1.7 * 0.93) / 0.45)
    assert h["offload"] is None and h["peak_memory_gib"]["rettn"] == pytest.approx(2.0)
    assert w["status"] == "not started" and w["cache_step_ms"] is None


def test_summary_reads_the_first_h200_run():
    """The first H200 run's files (older keys: no long step, no cache columns) still summarise."""
    if not (H200 / "summary.txt").exists():
        pytest.skip("the first H200 run's files are not on this machine")
    p = gpu_check_summary.profile_numbers(gpu_check_summary._load(H200 / "profile-cogvideox-2b.json"))
    assert p["cache_step_cost"] == pytest.approx(742.6 / 626.3, rel=1e-3)
    b = gpu_check_summary._bench(gpu_check_summary._load(H200 / "bench_attention.json"))
    assert [round(r["keep"], 5) for r in b["rows"]] == [0.03125, 0.0625]


def test_rehearsal_runs_every_step(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, TMPDIR=str(tmp_path))
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--rehearse"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    log = (out / "log.txt").read_text() if (out / "log.txt").exists() else ""
    assert proc.returncode == 0, proc.stderr[-3000:] + log[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    _keys_match(summary)
    failed = {n: s for n, s in summary["steps"].items() if not s["ok"]}
    assert not failed, f"{failed}\n{log[-4000:]}"
    assert summary["mode"] == "rehearse" and summary["ok"] and summary["complete"]
    assert set(summary["env"]) == ENV

    # the kernel benchmark: both keeps, every provider timed (cuDNN's SDPA has no CPU kernel)
    rows = summary["bench"]["rows"]
    assert [r["keep"] for r in rows] == [0.03125, 0.0625]
    for r in rows:
        assert set(r) == BENCH_ROW and set(r["ms"]) >= BENCH_MS  # a newer benchmark may add columns
        assert 0 < r["density"] <= 1 and r["backend"] == "triton"
        assert all(r["ms"][k] > 0 for k in BENCH_MS - {"sdpa_cudnn"})
        assert r["rettn_vs_flex_max_abs"] < 2e-2  # the two sparse kernels agree on the real layout

    tests = summary["tests"]
    assert tests["passed"] >= 10 and tests["failed"] == 0 and tests["errors"] == 0

    p = summary["profile"]
    assert p["schedule"] == {"dense": 1, "cache": 1, "sparse": 2} and 0 < p["mean_density"] < 1
    assert p["kernel_rows"] and p["sparse_step_ms"] > 0
    long = summary["long"]
    assert set(long) == {"hunyuanvideo", "wan2.1-14b"}
    for arch, lc in long.items():
        assert lc["status"] == "done" and lc["schedule"] == {"dense": 1, "cache": 1, "sparse": 2}, (arch, lc)
        assert lc["dense_step_ms"] > 0 and lc["cache_step_ms"] > 0 and lc["sparse_step_ms"] > 0
        assert lc["cache_step_cost"] > 0 and lc["sparse_step_vs_ceiling"] > 0
    assert long["hunyuanvideo"]["offload"]["run_cost"] > 0 and long["wan2.1-14b"]["offload"] is None
    assert {t["where"] for t in summary["targets"]} >= {"profile cogvideox-2b", "compile", "long hunyuanvideo",
                                                         "long wan2.1-14b"}
    assert all(t["value"] is not None and t["met"] is not None for t in summary["targets"]), summary["targets"]
    c = summary["compile"]
    assert set(c["median_s"]) == {"dense eager", "dense compiled", "rettn eager", "rettn compiled"}
    assert c["schedule"]["sparse"] >= 1  # the compile benchmark times sparse steps

    # every GPU step launches rettn's Triton kernel; each launch is mapped to the GPU's tiles
    k = summary["kernels"]
    for name in STEPS - {"install", "select"}:  # selection is torch ops: no Triton launch
        step = k["per_step"][name]
        assert step["count"] >= 1 and not step["unmapped"] and not step["replay_errors"], (name, step)
    assert k["distinct"] == len(k["keys"]) >= 8
    assert all("UPCAST" not in item["key"] for item in k["keys"])  # GPU launches: no interpreter upcast
    screen = (out / "summary.txt").read_text()
    assert "all steps ok" in screen and all(item["key"] in screen for item in k["keys"])
    assert len(summary["files"]) <= 8  # the device tool returns at most 8 files
    assert summary["files"] == sorted(p.name for p in out.iterdir())
