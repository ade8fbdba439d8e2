"""``rettn calibrate``: the cheapest schedule that holds a PSNR floor, written as a preset.

    rettn calibrate --prompts prompts.txt --floor-psnr 30 --out my-preset.yaml
    rettn calibrate --model THUDM/CogVideoX-2b --prompts p.txt --steps 50 --max-cache-bytes 8GB --out cog.yaml
    rettn generate --preset my-preset.yaml --prompt "..."
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from rettn.tools import args as common
from rettn.tools.args import CLIError

FIELDS = ("pattern", "block_size", "ramp", "min_seq_len", "backend")  # the base config's, not searched
DESCRIPTION = ("Find the cheapest sparse schedule (keep ratio, warm-up, refresh interval, dense tail, how R is "
               "kept) whose outputs keep a PSNR floor against dense on your prompts, and write it as a preset "
               "YAML, with a JSON report and a PNG chart beside it. Use it with rettn generate --preset FILE.")


def register(subparsers):
    """Add the ``calibrate`` subcommand."""
    from rettn.tools import calibrate as cal

    p = subparsers.add_parser("calibrate", help="find the cheapest schedule that holds a quality floor; write it as a preset",
                              description=DESCRIPTION)
    p.add_argument("--model", default=None, help="Hub id or local folder (default: the embedded model)")
    p.add_argument("--preset", default=None, help="base preset: block size, pattern, ramp; also the 'hand' row of the report")
    p.add_argument("--prompts", default=None, metavar="FILE", help="calibration prompts, one per line (default: 2 captions of the embedded model)")
    p.add_argument("--seeds", type=common.seed, nargs="+", default=[0], help="seeds; each prompt runs with each")
    p.add_argument("--floor-psnr", type=common.nonneg_float, default=30.0,
                   help="every calibration sample keeps this PSNR (dB, >= 0) against dense")
    p.add_argument("--max-attn-error", type=common.positive_float, default=None,
                   help="also bound each step's predicted attention error (relative L2, > 0; default: no bound)")
    p.add_argument("--out", default="calibrated.yaml", help="the preset file; its .json report and .png chart go beside it")
    s = p.add_argument_group("search space")
    s.add_argument("--steps", type=common.positive_int, default=None, help="denoising steps (default: the pipeline's)")
    s.add_argument("--keeps", type=common.fraction, nargs="+", default=list(cal.DEFAULT_KEEPS),
                   help="keep ratios to try (fractions of key blocks per query block, in (0, 1])")
    s.add_argument("--intervals", type=common.positive_int, nargs="+", default=list(cal.DEFAULT_INTERVALS), help="refresh intervals (steps)")
    s.add_argument("--warmups", type=common.step_fraction, nargs="+", default=list(cal.DEFAULT_WARMUPS),
                   help="dense warm-ups, fractions of the steps in [0, 1)")
    s.add_argument("--finals", type=common.step_fraction, nargs="+", default=list(cal.DEFAULT_FINALS),
                   help="dense tails, fractions of the steps in [0, 1)")
    s.add_argument("--reselects", nargs="+", choices=["cache", "step"], default=["cache", "step"],
                   help="when top-k blocks are chosen: at each cache step, or at every sparse step")
    s.add_argument("--residuals", nargs="+", choices=list(cal.RESIDUALS), default=list(cal.RESIDUALS),
                   help="how R is kept: native (the attention's dtype), float8_e4m3fn, none (rho only)")
    s.add_argument("--max-dense-layers", type=common.nonneg_int, default=2, help="layers the plan may keep dense")
    s.add_argument("--max-cache-bytes", default=None, help="budget for cached rho + R, e.g. 8GB (default: no budget)")
    c = p.add_argument_group("cost and time")
    c.add_argument("--target", default=None, help="rank by FLOPs of this architecture (configs/archs), e.g. cogvideox-2b; default: time measured here")
    c.add_argument("--max-confirm", type=common.positive_int, default=8, help="full-generation confirmations at most")
    c.add_argument("--time-budget", type=common.positive_float, default=None, metavar="SECONDS",
                   help="stop confirming after this long (default: no limit)")
    common.add_run_flags(c)
    common.add_config_flags(p, FIELDS, title="base config (not searched; override the preset)")
    p.set_defaults(handler=run_calibrate)  # cli.main reports rettn's errors in one line
    return p


def run_calibrate(args) -> int:
    """The whole command on parsed ``args``: 0 when a preset was written, 1 when no schedule held
    the floor; bad input is a one-line error (exit 2) before any model loads."""
    from rettn.core.config import load_preset, parse_bytes
    from rettn.tools import calibrate as cal
    from rettn.tools.evaluate import DEFAULT_PROMPTS
    from rettn.tools.models import default_preset, load_pipeline, quiet_progress_bars
    from rettn.tools.profile.archs import arch_names

    out = Path(args.out)
    if out.suffix not in (".yaml", ".yml"):
        raise CLIError(f"--out must name a .yaml file, got '{out}'")
    common.check_output(out, "--out")
    common.check_config_flags(args, FIELDS)
    if args.preset is not None:
        load_preset(args.preset)
    parse_bytes(args.max_cache_bytes)
    if args.target is not None and args.target not in arch_names():
        raise CLIError(f"unknown --target {args.target!r}; known architectures: {arch_names()}")
    prompts = DEFAULT_PROMPTS[:2]
    if args.prompts:
        prompts = tuple(p for _, p in common.read_prompt_file(args.prompts))
    elif args.model is not None:
        raise CLIError("--prompts FILE is needed with --model (calibration prompts for that model)")
    cal.check_options(prompts, tuple(args.seeds), args.floor_psnr, args.max_attn_error, args.keeps, args.intervals,
                      args.warmups, args.finals, args.residuals, args.reselects)
    if args.no_progress:
        quiet_progress_bars()
    device = common.device(args.device)
    common.check_backend(args.backend, device)
    pipe = load_pipeline(args.model, device=str(device), dtype=common.dtype(None, device))
    pipe.set_progress_bar_config(disable=True)
    base = common.build_config(args, FIELDS, args.preset or default_preset(pipe))
    t = time.perf_counter()
    result = cal.calibrate(
        pipe, list(prompts), tuple(args.seeds), floor_psnr=args.floor_psnr, max_attn_error=args.max_attn_error,
        config=base, steps=args.steps, keeps=tuple(args.keeps), intervals=tuple(args.intervals),
        warmups=tuple(args.warmups), finals=tuple(args.finals), reselects=tuple(args.reselects),
        residuals=tuple(args.residuals), max_dense_layers=args.max_dense_layers,
        max_cache_bytes=args.max_cache_bytes, target=args.target, max_confirm=args.max_confirm,
        time_budget=args.time_budget, progress=not args.no_progress)
    result.base_preset = args.preset or default_preset(pipe)
    print(result.summary())
    written = result.write(out)
    print(f"rettn: calibrated in {time.perf_counter() - t:.0f} s; wrote {', '.join(written)}")
    if result.config is None:
        print("rettn: no schedule held the floor: no preset written (the report says what was tried)", file=sys.stderr)
        return 1
    return 0
