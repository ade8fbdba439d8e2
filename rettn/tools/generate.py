"""``rettn generate``: images or videos from a diffusers pipeline made sparse by rettn (or dense),
one prompt or a prompt file split over processes, with an optional dense comparison."""

from __future__ import annotations

import inspect
import time
from pathlib import Path

import torch

from rettn.core.config import load_preset
from rettn.tools import args as common
from rettn.tools import media
from rettn.tools.args import CLIError
from rettn.tools.models import quiet_progress_bars

FIELDS = common.GENERATE_FIELDS


def register(subparsers):
    """Add the ``generate`` subcommand."""
    g = subparsers.add_parser(
        "generate",
        help="generate images or videos, sparse (default) or dense",
        description="Generate with a diffusers pipeline made sparse by rettn. Without --model the "
        "embedded tiny video model (coloured shapes, 4 frames of 32x32) runs offline.",
    )
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the text prompt")
    src.add_argument("--prompts", metavar="FILE", help="a file with one prompt per line; each output is named after its line")
    g.add_argument("--negative-prompt", default=None, help="what the output should not show (pipelines with CFG; default: the pipeline's)")
    g.add_argument("--model", default=None, help="Hub id or local pipeline folder (default: the embedded model)")
    g.add_argument("--preset", default=None, help="rettn preset (default: the model family's first preset)")
    common.add_config_flags(g, FIELDS)
    r = g.add_argument_group("generation")
    r.add_argument("--steps", type=common.positive_int, help="denoising steps (default: the pipeline's)")
    r.add_argument("--seed", type=common.seed, default=0, help="seed; with --prompts, line i uses seed + i")
    r.add_argument("--height", type=common.positive_int, help="pixels (default: the pipeline's)")
    r.add_argument("--width", type=common.positive_int, help="pixels (default: the pipeline's)")
    r.add_argument("--frames", type=common.positive_int, help="number of frames (video models)")
    r.add_argument("--guidance", type=common.nonneg_float, help="classifier-free guidance scale (default: the pipeline's)")
    r.add_argument("--dense", action="store_true", help="baseline run without rettn")
    r.add_argument("--compare", action="store_true", help="also run dense with the same seed; write both side by side; print PSNR/SSIM and the speedup")
    r.add_argument("--lpips", action="store_true", help="with --compare: also LPIPS (needs the lpips package and its "
                   "network's weights, downloaded on first use)")
    r.add_argument("--dtype", choices=sorted(common.DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    o = g.add_argument_group("output")
    o.add_argument("--out", default=None, help="output file (.png/.jpg images, .mp4/.gif videos); with --prompts a folder (default: outputs/)")
    o.add_argument("--format", default=None, help="with --prompts: file extension of each output (default .gif for video, .png for images)")
    o.add_argument("--fps", type=common.positive_int, default=8, help="frames per second of video outputs")
    o.add_argument("--upscale", type=common.positive_int, default=1, help="enlarge outputs by this factor (nearest neighbour)")
    o.add_argument("--json", default=None, metavar="FILE", help="also write a JSON summary")
    common.add_run_flags(r)
    g.set_defaults(handler=run)
    return g


def run(args) -> int:
    """``rettn generate``: 0, or 2 with one line on stderr for bad input."""
    return common.report_errors(generate, args)


def _read_prompts(args) -> list[tuple[int, str]]:
    """(line number from 1, prompt) pairs: ``--prompt`` is line 0."""
    if args.prompt is not None:
        if not args.prompt.strip():
            raise CLIError("--prompt is empty")
        return [(0, args.prompt)]
    return common.read_prompt_file(args.prompts)


def _config(args, pipe):
    from rettn.tools.models import default_preset

    preset = args.preset if args.preset is not None else default_preset(pipe)
    return common.build_config(args, FIELDS, preset), preset or "defaults"


def _call_kwargs(args, pipe, prompt: str, seed: int, device) -> dict:
    params = inspect.signature(pipe.__call__).parameters
    kw = {"prompt": prompt, "output_type": "np", "generator": torch.Generator(device="cpu").manual_seed(seed)}
    wanted = {
        "negative_prompt": args.negative_prompt, "num_inference_steps": args.steps, "height": args.height,
        "width": args.width, "num_frames": args.frames, "guidance_scale": args.guidance,
    }
    for name, value in wanted.items():
        if value is None:
            continue
        if name not in params:
            flag = {"num_inference_steps": "--steps", "num_frames": "--frames", "guidance_scale": "--guidance"}.get(
                name, "--" + name.replace("_", "-"))
            raise CLIError(f"{flag} does not apply to {type(pipe).__name__}")
        kw[name] = value
    return kw


def _is_video(pipe) -> bool:
    return "num_frames" in inspect.signature(pipe.__call__).parameters


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run(pipe, kwargs, device):
    """(first output as float array, seconds)."""
    _sync(device)
    t = time.perf_counter()
    out = common.call_pipeline(pipe, **kwargs)
    _sync(device)
    seconds = time.perf_counter() - t
    data = out.frames[0] if hasattr(out, "frames") else out.images[0]
    return data, seconds


def _write_media(path, data, is_video: bool, args) -> None:
    try:
        media.write(path, data, is_video, fps=args.fps, upscale=args.upscale)
    except OSError as e:
        raise common.write_failed(path, "--out", e) from None


def _targets(args, items, is_video, out_dir):
    """{line: output path}: one file, or with --prompts a file per line in ``out_dir``."""
    if args.prompts is not None:
        ext = args.format or (".gif" if is_video else ".png")
        ext = ext if ext.startswith(".") else "." + ext
        targets = {i: out_dir / f"{i:04d}-{media.slug(p)}{ext}" for i, p in items}
    else:
        targets = {items[0][0]: Path(args.out or ("rettn_out.gif" if is_video else "rettn_out.png"))}
    media.check_extension(next(iter(targets.values())), is_video)
    return targets


def _check_outputs(args):
    """Where the outputs go: checked now, not after the whole generation. Returns --prompts' folder."""
    out_dir = None
    if args.prompts is not None:
        out_dir = Path(args.out or "outputs")
        if out_dir.suffix and out_dir.suffix.lower() in media.IMAGE_EXTS + media.VIDEO_EXTS:
            raise CLIError(f"with --prompts, --out is a folder, not a file ('{out_dir}')")
        common.check_output(out_dir, "--out", folder=True)
    elif args.out is not None:
        common.check_output(args.out, "--out")
    else:
        common.check_output(Path("."), "--out", folder=True)  # the default file goes to the working folder
    if args.json:
        common.check_output(args.json, "--json")
    return out_dir


def generate(args) -> dict:
    """The whole command on parsed ``args``; returns the summary (also written with --json)."""
    from accelerate import PartialState

    from rettn.diffusers import apply_rettention
    from rettn.tools.models import load_pipeline

    if args.dense and args.compare:
        raise CLIError("--dense and --compare cannot be combined (--compare already runs the dense baseline)")
    if args.lpips and not args.compare:
        raise CLIError("--lpips compares rettn's output with the dense one: add --compare")
    used = common.flags_used(args, FIELDS)
    if args.dense and (used or args.preset):
        raise CLIError(f"--dense runs without rettn; drop the sparsity options ({', '.join(used or ['--preset'])})")
    common.check_config_flags(args, FIELDS)
    if args.preset is not None:
        load_preset(args.preset)  # unknown preset: fail before loading anything
    if args.no_progress:
        quiet_progress_bars()
    state = PartialState()
    device = common.device(args.device) if state.num_processes == 1 or args.device == "cpu" else state.device
    common.check_backend(args.backend, device)
    dtype = common.dtype(args.dtype, device)
    items = _read_prompts(args)
    out_dir = _check_outputs(args)

    lpips_model = load_lpips() if args.lpips else None  # asked for: unavailable is an error, before the model loads

    pipe = load_pipeline(args.model, device=str(device), dtype=dtype)
    pipe.set_progress_bar_config(disable=args.no_progress or not state.is_local_main_process, leave=False)
    is_video = _is_video(pipe)
    config, preset = (None, None) if args.dense else _config(args, pipe)
    if config is not None and args.backend is None:  # the preset's backend, before any step runs
        common.check_backend(config.backend, device, source=f"preset '{preset}' sets backend triton, which")
    targets = _targets(args, items, is_video, out_dir)

    from tqdm.auto import tqdm

    results, skipped, t0 = [], 0, time.perf_counter()
    with state.split_between_processes(items) as mine:
        bar = tqdm(mine, desc=f"prompts[{state.process_index}]", position=state.process_index,
                   disable=args.no_progress or len(items) <= 1, leave=False)
        for index, prompt in bar:
            target = targets[index]
            if out_dir is not None and target.exists():
                skipped += 1
                continue
            seed = args.seed + (index if out_dir is not None else 0)
            results.append(_generate_one(args, pipe, prompt, seed, target, device, is_video, config,
                                         lpips_model, apply_rettention))
    summary = _summarise(state, results, skipped, time.perf_counter() - t0, preset, config)
    if args.json and state.is_main_process:
        common.write_json(args.json, summary)
    return summary


def _apply(apply, pipe, config):
    try:
        return apply(pipe, config)
    except (ValueError, TypeError) as e:  # the model rettn cannot make sparse: one line
        raise CLIError(str(e)) from None


def load_lpips():
    """The LPIPS model for ``--lpips``; a one-line CLIError when its package or weights do not load."""
    from rettn.tools.metrics import LPIPS

    try:
        return LPIPS.load()
    except RuntimeError as e:
        raise CLIError(str(e)) from None


def _generate_one(args, pipe, prompt, seed, target, device, is_video, config, lpips_model, apply):
    from rettn.tools.metrics import compare

    record = {"prompt": prompt, "seed": seed, "output": str(target)}
    if args.dense:
        data, record["seconds"] = _run(pipe, _call_kwargs(args, pipe, prompt, seed, device), device)
    else:
        if args.compare:
            dense, record["dense_seconds"] = _run(pipe, _call_kwargs(args, pipe, prompt, seed, device), device)
        clocks = _clocks(pipe, device) if args.compare else None  # before rettn: its work is timed too
        try:
            handle = _apply(apply, pipe, config)
            try:
                if clocks is not None:
                    clocks.watch(handle.engine)
                data, record["seconds"] = _run(pipe, _call_kwargs(args, pipe, prompt, seed, device), device)
                stats = handle.stats()
            finally:
                handle.remove()
            pays = _pays_line(clocks, stats, config, device) if clocks is not None else None
        finally:
            if clocks is not None:
                clocks.remove()
        record["density"] = stats.mean_density()
        record["steps"] = stats.counts()
        if stats.adaptive:  # what the adaptive schedule did (warmup / refresh_interval "auto")
            record["schedule"] = stats.kind_letters()
            record["refreshes"] = [vars(r) for r in stats.refreshes]
            print(f"{target.name}: {record['schedule']} ({stats.adaptive})")
    _write_media(target, data, is_video, args)
    if args.compare:
        q = compare(dense, data, lpips_model)
        record.update(q)
        both = target.with_name(f"{target.stem}-compare{target.suffix}")
        _write_media(both, media.side_by_side(dense, data), is_video, args)
        record["compare_output"] = str(both)
        lp = f", LPIPS {q['lpips']:.4f}" if q["lpips"] is not None else ""
        from rettn.tools.profile.baseline import default_description

        speed = record["dense_seconds"] / record["seconds"]
        vs = default_description(getattr(pipe, "transformer", None) or getattr(pipe, "unet", None))
        print(f"{target.name}: PSNR {q['psnr']:.2f} dB, SSIM {q['ssim']:.4f}{lp}; dense {record['dense_seconds']:.2f} s, "
              f"rettn {record['seconds']:.2f} s, speedup {speed:.2f}x vs {vs}; side by side (dense | rettn): {both}")
        record["speedup"], record["speedup_vs"] = speed, vs
        if pays is not None:
            record.update(pays[1])
            print(pays[0])
    return record


def _clocks(pipe, device):
    """The step clocks of the rettn run of ``--compare`` (None: no transformer to hook)."""
    from rettn.tools.breakeven import RunClocks

    model = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    return RunClocks(model, device) if isinstance(model, torch.nn.Module) else None


def _pays_line(clocks, stats, config, device):
    """(the line that says whether sparsity pays here, its numbers for the JSON summary)."""
    from rettn.tools import breakeven

    shape = clocks.capture.shape
    if shape is None:  # no attention call reached rettn
        return None
    share = clocks.attention_share(stats.kinds())
    counts, costs = stats.counts(), clocks.kind_costs(stats.kinds())
    if not counts["cache"] and not counts["sparse"]:
        return None  # an all-dense schedule: nothing to weigh
    paid = breakeven.run_pays(costs, counts)  # None: no dense step in the run to weigh against
    rows = [] if paid is None else [(shape[2], *(costs.get(k) for k in ("dense", "cache", "sparse")))]  # per step
    first = shape[2] if paid else None
    if first is None:  # longer sequences: the ops at the run's shape and its counted density
        keep = stats.mean_density() or config.keep
        lengths = breakeven.lengths_from(shape[2])
        first, more = breakeven.pays_from(shape[0], shape[1], shape[3], clocks.capture.dtype, device, keep,
                                          config.block_size, lengths if rows else [shape[2], *lengths],
                                          counts["cache"], counts["sparse"], backend=config.backend)
        rows += more
    text = breakeven.line(share, shape[2], first, rows, device, config.keep, counts, stats.mean_density())
    numbers = {"attention_share": None if share is None else share[0], "sparse_pays_from": first,
               "pays_measured": [{"tokens": n, "dense_s": d, "cache_s": c, "sparse_s": s_,
                                  "per": "step of this run" if i == 0 and paid is not None else "attention call (ops)"}
                                 for i, (n, d, c, s_) in enumerate(rows)],
               "sparse_slower_shapes": [str(c.shape) for c in stats.slower_shapes]}
    return text, numbers


def _summarise(state, results, skipped, seconds, preset, config) -> dict:
    from accelerate.utils import gather_object

    if state.num_processes > 1:
        results = gather_object(results)
        skipped = sum(gather_object([skipped]))
    summary = {"outputs": results, "written": len(results), "skipped_existing": skipped, "seconds": seconds,
               "preset": preset, "config": None if config is None else vars(config)}
    dens = [r["density"] for r in results if r.get("density") is not None]
    summary["mean_density"] = sum(dens) / len(dens) if dens else None
    kinds = {k: sum(r.get("steps", {}).get(k, 0) for r in results) for k in ("dense", "cache", "sparse")}
    if state.is_main_process:
        mode = "dense" if config is None else f"rettn preset {preset}, keep {config.keep}"
        dtext = "" if summary["mean_density"] is None else (
            f", mean counted density {summary['mean_density']:.4f}; steps: {kinds['dense']} dense, "
            f"{kinds['cache']} cache, {kinds['sparse']} sparse")
        skip = f" (skipped {skipped} existing)" if skipped else ""
        target = results[0]["output"] if len(results) == 1 else f"{len(results)} outputs"
        print(f"rettn: wrote {target}{skip} in {seconds:.1f} s [{mode}]{dtext}")
    return summary
