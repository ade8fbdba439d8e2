"""The GPU check's rehearsal: ``scripts/gpu_check.sh --rehearse`` runs every step of the GPU
check on CPU (tiny shapes, the Triton interpreter) and must succeed with the summary the GPU
run writes, so that a broken step shows here and not in the GPU's short window."""

import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check_summary  # noqa: E402

STEPS = {"install", "bench", "tests", "profile", "compile"}
TOP = {"mode", "complete", "ok", "budget_s", "elapsed_s", "env", "steps", "bench", "tests", "profile", "compile",
       "kernels", "files"}
STEP = {"rc", "ok", "seconds", "cap_s", "timed_out", "ran"}
ENV = {"python", "torch", "triton", "diffusers", "cuda", "device_name", "capability"}
BENCH_ROW = {"seq", "keep", "density", "backend", "kv_blocks_per_row", "best_sdpa", "ms", "speedup_vs_sdpa",
             "speedup_vs_sdpa_with_select", "rescaled_speedup_vs_sdpa", "speedup_vs_flex", "flex_speedup_vs_sdpa",
             "dense_lse_vs_sdpa", "rettn_vs_flex_max_abs", "errors"}
BENCH_MS = {"sdpa", "sdpa_flash", "sdpa_cudnn", "flex", "flex_mask", "rettn", "rettn_lse", "rettn_rescaled",
            "dense_lse", "dense_lse_triton", "select"}
TESTS = {"passed", "failed", "skipped", "errors", "summary_line", "failures"}
PROFILE = {"dense_step_ms", "rettn_dense_step_ms", "cache_step_ms", "sparse_step_ms", "sparse_attention_ms",
           "sparse_step_speedup", "cache_step_cost", "run_dense_s", "run_rettn_s", "run_speedup", "ceiling_speedup",
           "mean_density", "steps", "schedule", "shape", "kernel_rows", "targets"}
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


def test_summary_of_a_gpu_run_that_produced_nothing_has_the_same_keys(tmp_path):
    """A GPU run cut off before any step: the summary still has every key (values null)."""
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    summary = gpu_check_summary.build(out, work, rehearse=False, budget=400, start=0)
    _keys_match(summary)
    assert summary["mode"] == "gpu" and not summary["ok"] and not summary["complete"]
    assert "NOT all steps ok" in gpu_check_summary.text(summary)


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
        assert set(r) == BENCH_ROW and set(r["ms"]) == BENCH_MS
        assert 0 < r["density"] <= 1 and r["backend"] == "triton"
        assert all(r["ms"][k] > 0 for k in BENCH_MS - {"sdpa_cudnn"})
        assert r["rettn_vs_flex_max_abs"] < 2e-2  # the two sparse kernels agree on the real layout

    tests = summary["tests"]
    assert tests["passed"] >= 10 and tests["failed"] == 0 and tests["errors"] == 0

    p = summary["profile"]
    assert p["schedule"] == {"dense": 1, "cache": 1, "sparse": 2} and 0 < p["mean_density"] < 1
    assert p["kernel_rows"] and p["sparse_step_ms"] > 0
    c = summary["compile"]
    assert set(c["median_s"]) == {"dense eager", "dense compiled", "rettn eager", "rettn compiled"}
    assert c["schedule"]["sparse"] >= 1  # the compile benchmark times sparse steps

    # every GPU step launches rettn's Triton kernel; each launch is mapped to the GPU's tiles
    k = summary["kernels"]
    for name in STEPS - {"install"}:
        step = k["per_step"][name]
        assert step["count"] >= 1 and not step["unmapped"] and not step["replay_errors"], (name, step)
    assert k["distinct"] == len(k["keys"]) >= 8
    assert all("UPCAST" not in item["key"] for item in k["keys"])  # GPU launches: no interpreter upcast
    screen = (out / "summary.txt").read_text()
    assert "all steps ok" in screen and all(item["key"] in screen for item in k["keys"])
    assert len(summary["files"]) <= 8  # the device tool returns at most 8 files
    assert summary["files"] == sorted(p.name for p in out.iterdir())
