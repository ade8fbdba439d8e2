"""``rettn profile``: its arguments and the whole profile (warm-up, timed dense and rettn runs,
kernel table, report); ``scripts/profile_latency.py`` runs the same :func:`main`.

    rettn profile                                              # embedded tiny model, CPU or GPU
    rettn profile --random-weights --arch cogvideox-2b         # the real transformer, random weights
    rettn profile --random-weights --arch cogvideox-5b --layers 2 --frames 9 --height 96 --width 96

What it measures and writes: docs/profiling.md.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import time
import warnings
from pathlib import Path

from rettn.errors import ScheduleWarning, UsageError
from rettn.ops.attention import backend_choices
from rettn.tools import args as common
from rettn.tools.profile import baseline as dense_baseline
from rettn.tools.profile.kernels import density_keeps, kernel_table
from rettn.tools.profile.report import baseline_line, environment, format_report, load_average, write_chart
from rettn.tools.profile.runners import Capture, timed_run
from rettn.tools.profile.summary import KINDS, check_targets, summarize
from rettn.tools.profile.targets import EMBEDDED, EMBEDDED_PRESET, setup_arch, setup_pipeline

KERNEL_PROVIDERS = ("sdpa", "dense_lse", "rettn", "rettn_rescaled", "flex")
FIELDS = common.PROFILE_FIELDS


class ProfileError(UsageError):
    """Bad input to ``rettn profile``: printed as one line, exit code 2."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("what to profile (default: the embedded tiny video model)")
    src.add_argument("--model", default=None, help="Hub id or local pipeline folder, profiled end to end")
    src.add_argument("--random-weights", action="store_true",
                     help="build the real transformer of --arch with random weights (no download)")
    src.add_argument("--arch", default=None, help="with --random-weights: cogvideox-2b, cogvideox-5b, wan2.1-1.3b, "
                     "wan2.1-14b, hunyuanvideo, pixart-sigma, flux (configs/archs/*.yaml)")
    src.add_argument("--layers", type=common.positive_int, help="with --random-weights: at most N blocks of each kind")
    src.add_argument("--frames", type=common.positive_int, help="pixel frames (default: the model's)")
    src.add_argument("--height", type=common.positive_int, help="pixels (default: the model's)")
    src.add_argument("--width", type=common.positive_int, help="pixels (default: the model's)")
    src.add_argument("--text-len", type=common.positive_int, help="with --random-weights: text tokens")
    src.add_argument("--heads", type=common.positive_int, help="with --random-weights: attention heads instead of the "
                     "model's (same head dim; a narrower model for quick CPU runs)")
    src.add_argument("--batch", type=common.positive_int, help="with --random-weights: batch per transformer call")
    src.add_argument("--prompt", default=None, help="pipelines: the prompt")
    sp = common.add_config_flags(p, FIELDS)
    sp.add_argument("--preset", default=None, help="rettn preset (default: the model's)")
    r = p.add_argument_group("runs")
    r.add_argument("--steps", type=common.positive_int, help="denoising steps (default: the model's)")
    r.add_argument("--repeats", type=common.positive_int, default=1, help="timed runs of each mode (default 1)")
    r.add_argument("--warmup-runs", type=common.nonneg_int, default=1,
                   help="untimed warm-up rounds: a 2-step dense run and a 3-step rettn run (dense, cache, sparse) each (default 1)")
    r.add_argument("--dense-backend", choices=dense_baseline.CHOICES, default="auto",
                   help="the dense baseline's SDPA backend: auto (default: the one measured fastest at the model's "
                   "attention shape, pinned for both runs), default (PyTorch's own order, diffusers' default), or one named")
    r.add_argument("--dtype", choices=sorted(common.DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    r.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    r.add_argument("--seed", type=common.seed, default=0, help="seed of the inputs and the random weights")
    k = p.add_argument_group("kernel level")
    k.add_argument("--no-kernels", action="store_true", help="skip the kernel-level table")
    k.add_argument("--kernel-providers", default="sdpa,dense_lse,rettn,rettn_rescaled,flex",
                   help=f"comma-separated subset of {','.join(KERNEL_PROVIDERS)}")
    k.add_argument("--kernel-repeats", type=common.positive_int, default=None, help="timed calls per kernel (default 20 GPU, 5 CPU)")
    k.add_argument("--density-sweep", default=None,
                   help="comma-separated keep ratios for the kernel sweep, or 'none' (default: keep/2, 2 keep, 4 keep)")
    o = p.add_argument_group("output")
    o.add_argument("--json", default=None, metavar="FILE", help="JSON report (default: profile_results/profile-<model>.json)")
    o.add_argument("--chart", default=None, metavar="FILE", help="PNG chart (default: next to the JSON)")
    o.add_argument("--no-chart", action="store_true", help="write no PNG chart")


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``profile`` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "profile", help="time dense vs rettn per step kind, whole run and kernels",
        description="Latency profile of a diffusion transformer, dense vs with rettn: per denoising step "
        "(attention, block selection, rho/residual bookkeeping, other) for dense / cache / sparse steps, "
        "the whole run, the speedup and the schedule's ceiling, and kernels at the model's real attention "
        "shape. Without --model it profiles the embedded tiny model; --random-weights --arch NAME builds a "
        "real model's transformer with random weights.")
    add_arguments(p)
    p.set_defaults(handler=run)
    return p


def build_parser(prog: str = "rettn profile") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return p


def _config(args, preset: str | None):
    return common.build_config(args, FIELDS, preset)


def _check_args(args):
    if args.random_weights and args.arch is None:
        from rettn.tools.profile.archs import arch_names

        raise ProfileError(f"--random-weights needs --arch NAME; known: {', '.join(arch_names())}")
    if args.arch is not None and not args.random_weights:
        raise ProfileError("--arch builds a model with random weights: add --random-weights")
    if args.random_weights and args.model is not None:
        raise ProfileError("--model loads weights; --random-weights builds them: use one")
    if not args.random_weights:
        for flag in ("layers", "text_len", "batch", "heads"):
            if getattr(args, flag) is not None:
                raise ProfileError(f"--{flag.replace('_', '-')} applies to --random-weights only")
    elif args.prompt is not None:
        raise ProfileError("--prompt applies to pipelines; --random-weights runs the bare transformer")
    common.check_config_flags(args, FIELDS)
    providers = [x.strip() for x in args.kernel_providers.split(",") if x.strip()]
    bad = [x for x in providers if x not in KERNEL_PROVIDERS]
    if bad:
        raise ProfileError(f"unknown kernel provider(s) {bad}; choose from {', '.join(KERNEL_PROVIDERS)}")
    sweep = None
    if args.density_sweep is not None:
        if args.density_sweep.strip().lower() == "none":
            sweep = []
        else:
            try:
                sweep = [float(x) for x in args.density_sweep.split(",") if x.strip()]
            except ValueError:
                raise ProfileError(f"--density-sweep takes comma-separated keep ratios or 'none', got {args.density_sweep!r}") from None
            if any(not 0 < x <= 1 for x in sweep):
                raise ProfileError(f"--density-sweep values must be in (0, 1], got {args.density_sweep!r}")
    return providers, sweep


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "model"


def profile(args) -> dict:
    """Run the whole profile described by parsed ``args``; returns the report (also written)."""
    providers, sweep = _check_args(args)
    if args.preset is not None:
        from rettn.core.config import load_preset

        load_preset(args.preset)  # unknown preset: fail before building anything
    device = common.device(args.device)
    common.check_backend(args.backend, device)
    if device.type != "cuda" and args.dense_backend in ("cudnn", "efficient"):
        raise ProfileError(f"--dense-backend {args.dense_backend} needs CUDA; on {device.type}: auto, default, flash or math")
    # where the report goes: checked now, not after the runs
    common.check_output(args.json or "profile_results", "--json", folder=args.json is None)
    if args.chart and not args.no_chart:
        common.check_output(args.chart, "--chart")
    dtype = common.dtype(args.dtype, device)
    if args.random_weights:  # check the rettn options before building or loading anything
        from rettn.tools.profile.archs import load_arch

        _config(args, args.preset or load_arch(args.arch).preset)
    elif args.model in (None, EMBEDDED):
        _config(args, args.preset or EMBEDDED_PRESET)
    notes: list[str] = []
    load_before = load_average()
    if args.random_weights:
        runner, target, preset, steps, spec = setup_arch(args, device, dtype, notes)
    else:
        runner, target, preset, steps, spec = setup_pipeline(args, device, dtype, notes)
    preset = args.preset or preset
    config = _config(args, preset)
    target["dtype"] = str(dtype).replace("torch.", "")
    # an adaptive schedule decides as it runs: its kinds are those its first timed run took
    schedule_kinds = None if config.is_auto else config.schedule(steps).kinds(steps)

    # ---- warm-up (excluded): compiles kernels, allocators, caches, for every step kind. The
    # first rettn run reads the attention shape (a 1-step run without warm-up), then the dense
    # baseline's SDPA backend is chosen there, and every later run pins it.
    capture = Capture()
    warm_cfg = config.replace(warmup=1, refresh_interval=2, dense_final=0)
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # without warm-up runs this 1-step run has no sparse step, on purpose
        warnings.simplefilter("ignore", ScheduleWarning)
        timed_run(runner, 3 if args.warmup_runs else 1, device, warm_cfg, capture=capture, seed=args.seed)
    baseline = _baseline(args, capture, device)
    print(f"  dense baseline: {baseline_line(baseline.to_json())}", file=sys.stderr)
    for i in range(args.warmup_runs):
        timed_run(runner, 2, device, seed=args.seed, dense=baseline.context)
        if i:
            timed_run(runner, 3, device, warm_cfg, seed=args.seed, dense=baseline.context)
    warm_s = time.perf_counter() - t0
    if args.warmup_runs == 0:
        notes.append("no warm-up runs: one untimed 1-step rettn run read the attention shape; the timed runs "
                     "include the other one-time costs (kernel compilation, allocation)")
    warm_desc = (f"warm-up excluded: {args.warmup_runs} round(s) of a 2-step dense run and a 3-step rettn run "
                 f"(dense, cache, sparse steps), and the dense baseline's choice, {warm_s:.1f} s" if args.warmup_runs
                 else "no warm-up runs (none excluded)")

    # ---- timed runs, dense first in each round, both on the baseline's SDPA backend
    dense_runs, rettn_runs = [], []
    for i in range(args.repeats):
        dense_runs.append(timed_run(runner, steps, device, seed=args.seed, dense=baseline.context))
        rettn_runs.append(timed_run(runner, steps, device, config, seed=args.seed, dense=baseline.context))
        print(f"  timed round {i + 1}/{args.repeats}: dense {dense_runs[-1].total_s:.3f} s, "
              f"rettn {rettn_runs[-1].total_s:.3f} s", file=sys.stderr)
    summary = summarize(dense_runs, rettn_runs, baseline.describe())
    measured = [r.kind for r in rettn_runs[0].steps]
    if schedule_kinds is None:
        schedule_kinds = measured
        notes.append(f"adaptive schedule (tolerance {config.tolerance:g}): the step kinds are those the first timed "
                     "rettn run took")
    elif measured != schedule_kinds:
        notes.append(f"the rettn run's step kinds {measured} differ from the schedule's {schedule_kinds}")
    counts = {k_: schedule_kinds.count(k_) for k_ in KINDS}

    load_after = load_average()
    if device.type == "cpu" and load_before is not None and load_before >= (os.cpu_count() or 1):
        notes.append(f"the machine was busy before the runs (load average {load_before:.1f} on {os.cpu_count()} "
                     "cores): other processes skew CPU timings, the sparse path's many small ops most")
    report = {
        "tool": "rettn profile",
        "command": shlex.join(sys.argv),
        "python_executable": sys.executable,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "env": environment(device),
        "target": target,
        "preset": preset,
        "config": dict(vars(config)),
        "steps": steps,
        "schedule": {"kinds": schedule_kinds, "counts": counts},
        "warmup": {"runs": args.warmup_runs, "excluded": True, "seconds": warm_s, "description": warm_desc},
        "repeats": args.repeats,
        "load_average": {"before": load_before, "after": load_after},
        "timing": "CUDA events" if device.type == "cuda" else "time.perf_counter",
        "dense_baseline": baseline.to_json(),
        "summary": summary,
        "runs": {"dense": [r.to_json() for r in dense_runs], "rettn": [r.to_json() for r in rettn_runs]},
        "kernels": {"skipped": "not measured (the run stopped before the kernel table's first row was done)"},
        "backend_choices": backend_choices(),  # what backend=None chose for each call shape, and why
        "notes": notes,
    }
    if spec is not None and spec.targets:
        if target["full_size"] and args.preset in (None, spec.preset) and steps == spec.shape.steps and \
                not common.config_overrides(args, FIELDS):
            report["targets"] = check_targets(spec.targets, summary, baseline.describe())
        else:
            report["targets_note"] = (f"{spec.name}'s targets ({spec.targets}) apply to the full shape with its "
                                      "preset and step count: not checked for this run")
    json_path = Path(args.json or f"profile_results/profile-{_slug(target['name'])}.json")
    chart_path = Path(args.chart) if args.chart else json_path.with_suffix(".png")
    common.write_json(json_path, report)  # the runs are safe if the kernel table is cut or fails

    # ---- kernel level, at the captured shape; the JSON is rewritten after each row
    if args.no_kernels:
        report["kernels"] = {"skipped": "--no-kernels"}
    elif capture.shape is None:
        report["kernels"] = {"skipped": "no self-attention call reached rettn's engine (nothing to time)"}
    else:
        repeats = args.kernel_repeats or (20 if device.type == "cuda" else 5)

        def partial(table):
            report["kernels"] = table
            common.write_json(json_path, report)

        report["kernels"] = kernel_table(capture, config, providers, density_keeps(config.keep, sweep), repeats,
                                         baseline=baseline, on_row=partial)

    if args.no_chart:
        report["chart"] = None
    else:
        try:
            note = write_chart(report, chart_path)
        except OSError as e:
            raise common.write_failed(chart_path, "--chart", e) from None
        report["chart"] = None if note else str(chart_path)
        if note:
            notes.append(note)
    report["backend_choices"] = backend_choices()  # the kernel table's calls included
    common.write_json(json_path, report)
    report["json"] = str(json_path)
    print(format_report(report))
    print(f"wrote {json_path}" + (f" and {report['chart']}" if report["chart"] else ""))
    return report


def _baseline(args, capture, device) -> dense_baseline.DenseBaseline:
    """The dense baseline's SDPA backend at the captured attention shape (``--dense-backend``)."""
    if capture.shape is None:
        unknown = "no self-attention call reached rettn's engine: the attention shape is unknown"
        if args.dense_backend in ("auto", "default"):
            return dense_baseline.DenseBaseline(None, device.type, "default",
                                                note=f"{unknown}, so PyTorch's own order runs (not measured)")
        return dense_baseline.DenseBaseline(dense_baseline.backend_named(args.dense_backend), device.type, "named",
                                            note=f"{unknown}; --dense-backend {args.dense_backend}: not checked there")
    windows = min(3, args.kernel_repeats or 3)
    return dense_baseline.choose(args.dense_backend, capture.shape, capture.dtype, capture.device,
                                 scale=capture.scale, transposed=capture.transposed, windows=windows)


def run(args) -> int:
    """``rettn profile``: 0 on success; bad input prints one line ``rettn: error: ...`` and returns 2."""
    return common.report_errors(profile, args)


def main(argv=None, prog: str = "rettn profile") -> int:
    """The profile command on its own (``scripts/profile_latency.py``): the exit code."""
    return run(build_parser(prog).parse_args(argv))
