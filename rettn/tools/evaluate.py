"""Quality harness: every method at every keep ratio against dense attention, same seeds.

    rettn eval                                    # embedded model, default captions, 2 seeds
    rettn eval --keeps 0.0625 --methods sparse-topk rettn-topk --seeds 0

For each (prompt, seed) the dense output is generated once; each method runs through the same
engine (``use_rho`` / ``use_residual`` / ``ramp`` / ``pattern`` switches) with the same schedule,
and is compared with the dense output: PSNR, SSIM, LPIPS (with ``--lpips``: its package and weights),
the relative error of each sparse-step attention output against dense attention on the same
inputs, the counted density (conditioning rows and columns included) and the wall time.
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from rettn.core.observers import Observer
from rettn.tools import args as common
from rettn.tools.args import CLIError

# method -> RettnConfig fields; the schedule, block size and keep come from the base config.
METHODS: dict[str, dict] = {
    "sparse-window": dict(pattern="window", use_rho=False, use_residual=False),
    "sparse-topk": dict(pattern="topk", use_rho=False, use_residual=False),
    "window+residual": dict(pattern="window", use_rho=False, use_residual=True, ramp=0.0),  # DiTFastAttn-style
    "rettn-window": dict(pattern="window", ramp=0.04),
    "rettn-window-l0": dict(pattern="window", ramp=0.0),
    "rettn-topk": dict(pattern="topk", ramp=0.04),
    "rettn-topk-l0": dict(pattern="topk", ramp=0.0),
}
DEFAULT_KEEPS = (0.25, 0.125, 0.0625, 0.03125)
DEFAULT_PROMPTS = (
    "a red circle moving right",
    "a blue square moving up",
    "a green triangle moving left",
    "a yellow circle moving down",
    "a blue triangle moving right",
    "a red square moving left",
    "a yellow triangle moving up",
    "a green circle moving down",
)


class AttentionErrorLog(Observer):
    """An engine observer: (step, layer, relative L2 error vs dense attention on the same inputs)
    of each sparse-step attention output (costs a dense attention call per sparse call)."""

    def __init__(self, engine):
        self.engine, self.errors = engine, []

    def on_sparse_output(self, q, k, v, scale, info, out):
        from rettn.ops.attention import attention_with_lse

        dense, _ = attention_with_lse(q, k, v, scale=scale)
        err = (out.float() - dense.float()).norm() / dense.float().norm().clamp_min(1e-12)
        layer = info.slot.layer if info.slot is not None else info.layer
        self.errors.append((self.engine.step, layer, float(err)))


def _generate(pipe, prompt, seed, steps, extra):
    kwargs = dict(prompt=prompt, output_type="np", generator=torch.Generator().manual_seed(seed), **extra)
    if steps is not None:
        kwargs["num_inference_steps"] = steps
    device = pipe.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    out = common.call_pipeline(pipe, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    data = out.frames[0] if hasattr(out, "frames") else out.images[0]
    return np.asarray(data, dtype=np.float32), time.perf_counter() - t


def evaluate(pipe, base_config, prompts=DEFAULT_PROMPTS, seeds=(0, 1), methods=tuple(METHODS),
             keeps=DEFAULT_KEEPS, steps=None, layer_error=True, lpips_model=None, progress=True,
             call_kwargs=None) -> list[dict]:
    """One row per (method, keep): means over prompts x seeds. See the module docstring."""
    from tqdm.auto import tqdm

    from rettn.diffusers import apply_rettention
    from rettn.tools.metrics import compare

    extra = dict(call_kwargs or {})
    cases = [(p, s) for p in prompts for s in seeds]
    dense = {}
    for case in tqdm(cases, desc="dense", disable=not progress, leave=False):
        dense[case] = _generate(pipe, case[0], case[1], steps, extra)
    rows = []
    combos = [(m, k) for m in methods for k in keeps]
    for method, keep in tqdm(combos, desc="methods x keeps", disable=not progress):
        config = base_config.replace(keep=keep, **METHODS[method])
        per_case = []
        for case in cases:
            handle = apply_rettention(pipe, config)
            log = handle.engine.observe(AttentionErrorLog(handle.engine)) if layer_error else None
            try:
                data, seconds = _generate(pipe, case[0], case[1], steps, extra)
                stats, errors = handle.stats(), log.errors if log is not None else None
            finally:
                handle.remove()
            q = compare(dense[case][0], data, lpips_model)
            q.update(seconds=seconds, dense_seconds=dense[case][1], density=stats.mean_density(),
                     attn_rel_err=float(np.mean([e for _, _, e in errors])) if errors else None,
                     steps=stats.counts())
            per_case.append(q)
        row = dict(method=method, keep=keep, n=len(per_case), steps=per_case[0]["steps"])
        for key in ("psnr", "ssim", "lpips", "density", "attn_rel_err", "seconds", "dense_seconds"):
            vals = [c[key] for c in per_case if c[key] is not None and np.isfinite(c[key])]
            row[key] = float(np.mean(vals)) if vals else None
        row["psnr_min"] = min(c["psnr"] for c in per_case)
        rows.append(row)
    return rows


def format_table(rows) -> str:
    def f(x, spec):
        return "-" if x is None else format(x, spec)

    lines = ["method            keep    density  sparsity  PSNR dB  SSIM    LPIPS   attn err  s/run  dense s/run",
             "-" * 100]
    for r in rows:
        lines.append(
            f"{r['method']:<17} {r['keep']:<7.4f} {f(r['density'], '.4f'):>7}  {f(None if r['density'] is None else 1 - r['density'], '.1%'):>8}  "
            f"{f(r['psnr'], '6.2f'):>7}  {f(r['ssim'], '.4f'):>6}  {f(r['lpips'], '.4f'):>6}  "
            f"{f(r['attn_rel_err'], '.4f'):>8}  {f(r['seconds'], '.2f'):>5}  {f(r['dense_seconds'], '.2f'):>5}")
    return "\n".join(lines)


def plot(rows, path) -> str | None:
    """PSNR against counted density per method; returns a note when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot written"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["density"], r["psnr"]) for r in rows if r["method"] == method and r["psnr"] is not None)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.set_xscale("log")
    ax.set_xlabel("counted attention density (log)")
    ax.set_ylabel("PSNR vs dense (dB)")
    ax.set_title("rettn quality vs density")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# ------------------------------------------------------------------------------ command line
FIELDS = common.EVAL_FIELDS  # the schedule and block size of every method's config


def register(subparsers):
    """Add the ``eval`` subcommand."""
    p = subparsers.add_parser("eval", help="quality of every method and keep ratio against dense attention",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="Hub id or local folder (default: the embedded model)")
    p.add_argument("--preset", default=None, help="base preset for the schedule and block size")
    p.add_argument("--prompts", default=None, metavar="FILE", help="one prompt per line (default: 8 captions of the embedded model)")
    p.add_argument("--seeds", type=common.seed, nargs="+", default=[0, 1], help="seeds; each prompt runs with each")
    p.add_argument("--methods", nargs="+", default=list(METHODS), metavar="METHOD",
                   help=f"methods to compare, any of {', '.join(METHODS)} (default: all)")
    p.add_argument("--keeps", type=common.fraction, nargs="+", default=list(DEFAULT_KEEPS),
                   help="keep ratios (fractions of key blocks per query block, in (0, 1])")
    p.add_argument("--lpips", action="store_true", help="also LPIPS (needs the lpips package and its network's "
                   "weights, downloaded on first use)")
    p.add_argument("--steps", type=common.positive_int, default=None, help="denoising steps (default: the pipeline's)")
    p.add_argument("--no-layer-error", action="store_true", help="skip the per-layer attention error (saves a dense call per sparse call)")
    p.add_argument("--out-dir", default="eval_results", help="where the JSON and the PNG plot go")
    common.add_run_flags(p)
    common.add_config_flags(p, FIELDS, title="schedule and blocks of every method (override the preset)")
    p.set_defaults(handler=run)
    return p


def run(args) -> int:
    """``rettn eval``: 0, or 2 with one line on stderr for bad input."""
    return common.report_errors(run_eval, args)


def run_eval(args) -> dict:
    """The whole command on parsed ``args``; returns the report (also written). Bad input raises
    a :class:`rettn.errors.UsageError` (or ConfigError) with a one-line message, before any model loads."""
    from rettn.core.config import load_preset
    from rettn.tools.metrics import LPIPS
    from rettn.tools.models import default_preset, load_pipeline, quiet_progress_bars

    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        raise CLIError(f"unknown method(s) {bad}; choose from {list(METHODS)}")
    common.check_config_flags(args, FIELDS)
    if "auto" in (args.warmup, args.refresh_interval):
        raise CLIError("rettn eval runs every method on one fixed schedule; warmup / refresh_interval 'auto' would "
                       "decide it per method at run time (scripts/adaptive_heldout.py compares schedules)")
    if args.preset is not None:
        load_preset(args.preset)
    prompts = DEFAULT_PROMPTS
    if args.prompts:
        prompts = tuple(p for _, p in common.read_prompt_file(args.prompts))
    if args.no_progress:
        quiet_progress_bars()
    device = common.device(args.device)  # the check generate and profile use
    common.check_backend(args.backend, device)
    out = Path(args.out_dir)
    common.check_output(out, "--out-dir", folder=True)  # now, not after the whole evaluation
    lpips_model = None
    if args.lpips:  # asked for: unavailable is an error, before the model loads
        try:
            lpips_model = LPIPS.load()
        except RuntimeError as e:
            raise CLIError(str(e)) from None
    pipe = load_pipeline(args.model, device=str(device), dtype=common.dtype(None, device))
    pipe.set_progress_bar_config(disable=True)
    preset = args.preset or default_preset(pipe)
    base = common.build_config(args, FIELDS, preset)
    t = time.perf_counter()
    rows = evaluate(pipe, base, prompts, tuple(args.seeds), tuple(args.methods), tuple(args.keeps), args.steps,
                    layer_error=not args.no_layer_error, lpips_model=lpips_model, progress=not args.no_progress)
    seconds = time.perf_counter() - t
    print(format_table(rows))
    try:
        out.mkdir(parents=True, exist_ok=True)
        note = plot(rows, out / "quality.png")
    except OSError as e:
        raise CLIError(f"cannot write --out-dir '{out}': {e.strerror or e}") from None
    report = dict(
        rows=rows, command=" ".join(["rettn"] + sys.argv[1:]) if sys.argv and sys.argv[0].endswith("rettn") else " ".join(sys.argv),
        device=str(device), device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__, preset=preset, base_config=vars(base), prompts=list(prompts), seeds=list(args.seeds),
        steps=args.steps, lpips="computed" if args.lpips else "not asked for (--lpips)", seconds=seconds, date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    )
    common.write_json(out / "quality.json", report, "--out-dir")
    print(f"rettn: evaluated {len(rows)} (method, keep) pairs on {len(prompts)} prompts x {len(args.seeds)} seeds "
          f"in {seconds:.0f} s; wrote {out / 'quality.json'}" + (f" and {out / 'quality.png'}" if note is None else f" ({note})"))
    return report
