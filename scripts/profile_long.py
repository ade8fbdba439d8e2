#!/usr/bin/env python
"""Long sequences, dense vs rettn: HunyuanVideo 720p (129 frames, 119,056 tokens) and Wan 2.1
14B 720p (81 frames, 75,600 tokens), a few blocks of each with random weights, in one process
(the GPU check's ``long`` step):

    python scripts/profile_long.py --dense-steps 4 --json profile-long.json # a GPU (~2 minutes)
    python scripts/profile_long.py --cases hunyuanvideo+offload --layers 1 --heads 2 --frames 1 \\
        --height 256 --width 256 --text-len 16 --steps 4 --warmup 1 --refresh-interval 3 \\
        --min-seq-len 0 --device cpu --json /tmp/long.json                  # a CPU smoke run

Each case (``--cases``, comma-separated ``ARCH`` or ``ARCH+offload``) builds the transformer,
warms up (excluded: a 3-step rettn run -- dense, cache, sparse: kernel compiles and the backend
chooser's measurements happen there, and it reads the attention shape -- then the dense
baseline's SDPA backend is chosen at that shape as ``rettn profile`` chooses it, and a 1-step
dense run), then times a dense run (``--dense-steps`` of the ``--steps``: the dense steps are all
the same work, so a shorter dense run, scaled to ``--steps``, gives the same whole-run time in
less time) and a rettn run with the preset and the schedule flags, both on the baseline's backend.
After every case's dense and rettn runs, each ``+offload`` case is built again and its rettn run
repeated with R in host memory (``residual_device="cpu"``; its own 3-step warm-up first) to
measure what the offload costs.

The JSON is rewritten after every timed run (atomically), so a run cut short (the GPU check's
step cap) leaves what it measured. Per case it holds the runs (``RunRecord.to_json``: each step's
kind, seconds and engine regions) and a summary: per step kind means (attention / selection /
bookkeeping / other), the whole run, its ceiling (sparse attention free), the cache step's cost
and the sparse step against its own ceiling (the dense step with its attention cut to the
counted density). Uses ``rettn.tools.profile``'s builders, ``timed_run`` and, where present, its
dense baseline chooser (``rettn.tools.profile.baseline``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import launch_log  # noqa: E402  (scripts/: records kernel launches when RETTN_LAUNCH_LOG is set)

KINDS = ("dense", "cache", "sparse")
REGIONS = ("attention", "selection", "bookkeeping")
CONFIG_FIELDS = ("keep", "warmup", "refresh_interval", "dense_final", "min_seq_len", "backend")
DEFAULT_CASES = "hunyuanvideo+offload,wan2.1-14b"
_CHOSEN: dict = {}  # arch -> (dense baseline or None, note): the offload run pins the case's baseline


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def kind_rows(run: dict) -> dict:
    """Per step kind of one run (``RunRecord.to_json``): steps, mean seconds and mean regions."""
    rows = {}
    for kind in KINDS:
        steps = [s for s in run["steps"] if s["kind"] == kind]
        if not steps:
            continue
        row = {"steps": len(steps), "mean_s": _mean(s["seconds"] for s in steps)}
        for name in REGIONS:
            row[f"{name}_s"] = _mean((s.get("regions") or {}).get(name, 0.0) for s in steps)
        row["other_s"] = row["mean_s"] - sum(row[f"{name}_s"] for name in REGIONS)
        rows[kind] = row
    return rows


def case_summary(runs: dict, steps: int) -> dict:
    """The numbers of one case from its runs (any of them may be missing: a cut run)."""
    out: dict = {"steps": steps}
    dense, rettn, offload = runs.get("dense"), runs.get("rettn"), runs.get("rettn_offload")
    if dense:
        n = len(dense["steps"])
        out["dense_step_s"] = _mean(s["seconds"] for s in dense["steps"])
        out["dense_run_s"] = dense["total_s"] * steps / n if n else None
        out["dense_run_extrapolated_from_steps"] = n if n != steps else None
        out["dense_peak_memory_bytes"] = dense.get("peak_memory_bytes")
    for label, run in (("rettn", rettn), ("rettn_offload", offload)):
        if not run:
            continue
        rows = kind_rows(run)
        entry = {"run_s": run["total_s"], "rows": rows, "mean_density": run.get("mean_density"),
                 "counts": run.get("counts"), "peak_memory_bytes": run.get("peak_memory_bytes"),
                 "ceiling_s": run["total_s"] - sum((s.get("regions") or {}).get("attention", 0.0)
                                                   for s in run["steps"] if s["kind"] == "sparse")}
        out[label] = entry
    d = out.get("dense_step_s")
    r = out.get("rettn")
    if d and r:
        rows = r["rows"]
        # the reference dense step: the faster of the baseline's and rettn's own dense steps
        rd = (rows.get("dense") or {}).get("mean_s")
        ref = min(d, rd) if rd else d
        out["reference_dense_step_s"] = ref
        out["reference_dense"] = "rettn dense step" if rd and rd < d else "dense baseline step"
        # the whole run against the faster dense step: the dense run scaled to it
        dense_run = out["dense_run_s"] * ref / d if out.get("dense_run_s") else None
        out["run_speedup"] = dense_run / r["run_s"] if dense_run else None
        out["run_speedup_vs_baseline_run"] = out["dense_run_s"] / r["run_s"] if out.get("dense_run_s") else None
        out["ceiling_speedup"] = dense_run / r["ceiling_s"] if dense_run and r["ceiling_s"] > 0 else None
        if "cache" in rows:
            out["cache_step_cost"] = rows["cache"]["mean_s"] / ref
        if "sparse" in rows:
            out["sparse_step_speedup"] = ref / rows["sparse"]["mean_s"]
            attention = (rows.get("dense") or {}).get("attention_s")
            density = r.get("mean_density")
            if attention is not None and density is not None:
                ceiling = ref - min(attention, ref) * (1.0 - density)
                out["sparse_step_ceiling_s"] = ceiling
                out["sparse_step_vs_ceiling"] = ceiling / rows["sparse"]["mean_s"]
    o = out.get("rettn_offload")
    if r and o:
        out["offload"] = {
            "run_cost": o["run_s"] / r["run_s"],
            "cache_step_cost": _ratio(o["rows"], r["rows"], "cache"),
            "sparse_step_cost": _ratio(o["rows"], r["rows"], "sparse"),
            "peak_memory_saved_bytes": (r["peak_memory_bytes"] - o["peak_memory_bytes"])
            if r.get("peak_memory_bytes") and o.get("peak_memory_bytes") else None,
        }
    return out


def _ratio(a: dict, b: dict, kind: str):
    if kind in a and kind in b and b[kind]["mean_s"]:
        return a[kind]["mean_s"] / b[kind]["mean_s"]
    return None


def write_report(path: Path, report: dict) -> None:
    """Atomically: a kill while writing leaves the previous version, never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, path)


def parse_cases(text: str) -> list[tuple[str, bool]]:
    from rettn.tools.profile.archs import arch_names

    cases = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        arch, _, extra = item.partition("+")
        if arch not in arch_names() or extra not in ("", "offload"):
            raise SystemExit(f"profile_long.py: bad case {item!r}: ARCH or ARCH+offload, ARCH one of "
                             f"{', '.join(arch_names())}")
        cases.append((arch, extra == "offload"))
    return cases


def build_parser() -> argparse.ArgumentParser:
    from rettn.tools import args as common

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=DEFAULT_CASES, help=f"comma-separated ARCH or ARCH+offload (default {DEFAULT_CASES})")
    ap.add_argument("--layers", type=common.positive_int, default=2, help="blocks of each kind (default 2)")
    ap.add_argument("--steps", type=common.positive_int, default=10, help="denoising steps (default 10)")
    ap.add_argument("--dense-steps", type=common.positive_int, default=None,
                    help="steps of the timed dense run, scaled to --steps (default: --steps)")
    for flag in ("frames", "height", "width", "text-len", "heads", "batch"):
        ap.add_argument(f"--{flag}", type=common.positive_int, default=None, help="default: the model's")
    ap.add_argument("--preset", default=None, help="rettn preset (default: each model's)")
    common.add_config_flags(ap, CONFIG_FIELDS, title="rettn (override the preset; default schedule: "
                            "--warmup 2 --refresh-interval 4 --dense-final 0)")
    ap.add_argument("--dense-backend", choices=("auto", "default", "cudnn", "flash", "efficient", "math"),
                    default="auto", help="the dense baseline's SDPA backend, as rettn profile's flag (default auto: "
                    "the fastest measured at the attention shape, pinned for every timed run)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", choices=sorted(common.DTYPES), default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", required=True)
    return ap


def _setup(arch: str, args, device, dtype):
    from rettn.core.config import RettnConfig
    from rettn.tools import args as common
    from rettn.tools.profile.targets import setup_arch

    ns = argparse.Namespace(arch=arch, layers=args.layers, frames=args.frames, height=args.height, width=args.width,
                            text_len=args.text_len, heads=args.heads, batch=args.batch, seed=args.seed, steps=args.steps)
    notes: list[str] = []
    runner, target, preset, steps, _ = setup_arch(ns, device, dtype, notes)
    target["dtype"] = str(dtype).replace("torch.", "")
    overrides = {"warmup": 2, "refresh_interval": 4, "dense_final": 0}
    overrides.update(common.config_overrides(args, CONFIG_FIELDS))
    config = RettnConfig.from_preset(args.preset or preset, **overrides)
    return runner, target, args.preset or preset, steps, config, notes


def _release(device) -> None:
    if device.type == "cuda":
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()


def dense_baseline(capture, device, choice: str):
    """The dense baseline's SDPA backend, chosen at the captured attention shape as ``rettn
    profile`` chooses it (``rettn.tools.profile.baseline``: timed under each backend, the fastest
    pinned for the dense and the rettn runs): ``(baseline or None, note)``. None (PyTorch's own
    order) where that module or ``timed_run(dense=...)`` is missing, or the choice fails."""
    import inspect

    from rettn.tools.profile.runners import timed_run

    if choice == "default":
        return None, "--dense-backend default: PyTorch's own SDPA order"
    try:
        from rettn.tools.profile import baseline
    except ImportError:
        return None, "this rettn has no rettn.tools.profile.baseline: PyTorch's own SDPA order"
    if "dense" not in inspect.signature(timed_run).parameters or capture.shape is None:
        return None, "timed_run takes no dense context, or no attention call was seen: PyTorch's own SDPA order"
    try:
        chosen = baseline.choose(choice, capture.shape, capture.dtype, device, scale=capture.scale,
                                 transposed=getattr(capture, "transposed", False), windows=1)
    except Exception as e:  # noqa: BLE001 - recorded; the runs go on with PyTorch's order
        return None, f"choosing the dense baseline failed ({type(e).__name__}: {e}): PyTorch's own SDPA order"
    return chosen, None


def run_case(arch: str, args, device, dtype, report: dict, save, offload_only: bool = False) -> None:
    """Warm up and time one architecture: dense and rettn runs, or (``offload_only``) the rettn
    run with R in host memory. ``report['cases'][arch]`` is filled (and saved) as it goes."""
    from rettn.tools.profile.runners import Capture, timed_run

    case = report["cases"][arch]
    runner, target, preset, steps, config, notes = _setup(arch, args, device, dtype)
    warm = config.replace(warmup=1, refresh_interval=2, dense_final=0)
    if not offload_only:
        kinds = config.schedule(steps).kinds(steps)
        case.update(target=target, preset=preset, config=dict(vars(config)), notes=notes, runs={},
                    schedule={"kinds": kinds, "counts": {k: kinds.count(k) for k in KINDS}})
    key = "offload_warmup_s" if offload_only else "warmup_s"
    case["status"] = "warming up" + (" (offload)" if offload_only else "")
    save()
    # warm-up, excluded: kernel compiles, the backend chooser's measurements, allocations; the
    # 3-step rettn run (dense, cache, sparse) also reads the attention shape for the baseline
    t0 = time.perf_counter()
    capture = Capture()
    timed_run(runner, 3, device, warm.replace(residual_device="cpu") if offload_only else warm, capture=capture,
              seed=args.seed)
    if offload_only:  # the same baseline as the case's dense and rettn runs
        chosen, note = _CHOSEN.get(arch, (None, "PyTorch's own SDPA order"))
    else:
        chosen, note = _CHOSEN[arch] = dense_baseline(capture, device, args.dense_backend)
    pin = {"dense": chosen.context} if chosen is not None else {}
    if not offload_only:
        case["dense_baseline"] = chosen.to_json() if chosen is not None else {"backend": None, "note": note}
        timed_run(runner, 1, device, seed=args.seed, **pin)
    case[key] = time.perf_counter() - t0
    print(f"{arch}: {target['description']}; warm-up {case[key]:.1f} s; dense baseline "
          f"{chosen.describe() if chosen is not None else note}", flush=True)
    if offload_only:
        plan = [("rettn_offload", config.replace(residual_device="cpu"), steps)]
    else:
        plan = [("dense", None, args.dense_steps or steps), ("rettn", config, steps)]
    for label, cfg, n in plan:
        case["status"] = f"timing {label}"
        save()
        record = timed_run(runner, n, device, cfg, seed=args.seed, **pin)
        case["runs"][label] = record.to_json()
        case["summary"] = case_summary(case["runs"], steps)
        save()
        print(f"  {label}: {record.total_s:.3f} s for {n} steps", flush=True)
    case["status"] = "done" if offload_only or not case["offload"] else "dense and rettn done, offload next"
    save()
    del runner
    _release(device)


def main(argv=None) -> int:
    launch_log.install_from_env()
    args = build_parser().parse_args(argv)
    cases = parse_cases(args.cases)
    from rettn.ops.attention import backend_choices
    from rettn.tools import args as common
    from rettn.tools.profile.report import environment

    device = common.device(args.device)
    dtype = common.dtype(args.dtype, device)
    path = Path(args.json)
    report = {"tool": "scripts/profile_long.py", "command": shlex.join(sys.argv),
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "env": environment(device),
              "timing": "CUDA events" if device.type == "cuda" else "time.perf_counter",
              "cases": {arch: {"status": "not started", "offload": offload} for arch, offload in cases}}

    def save():
        report["backend_choices"] = backend_choices()
        write_report(path, report)

    save()
    failed = 0
    # dense and rettn of every case first, then the offload runs (the model built again)
    for arch, offload_only in [(a, False) for a, _ in cases] + [(a, True) for a, o in cases if o]:
        if offload_only and report["cases"][arch]["status"] == "failed":
            continue
        try:
            run_case(arch, args, device, dtype, report, save, offload_only)
        except Exception as e:  # noqa: BLE001 - recorded; the next case still runs
            failed += 1
            report["cases"][arch].update(status="failed", error=f"{type(e).__name__}: {e}")
            save()
            traceback.print_exc()
            _release(device)
    print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
