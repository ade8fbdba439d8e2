"""The ``rettn`` command line.

    rettn generate --prompt "a red circle moving right"              # embedded model, offline
    rettn generate --prompt "..." --compare --out clip.gif            # + dense baseline, PSNR/SSIM
    rettn generate --model THUDM/CogVideoX-2b --preset cogvideox-2b --prompt "..." --out cat.mp4
    accelerate launch --num_processes 4 -m rettn.tools.cli generate --prompts prompts.txt --out outputs/

Bad input gets one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from pathlib import Path

import torch

from rettn.tools import media
from rettn.core.config import RettnConfig, load_preset
from rettn.tools.models import quiet_progress_bars

EXIT_USAGE = 2
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


# ---------------------------------------------------------------------------------- parsing
def _steps_value(text: str):
    """A schedule value: an int step count, or a float fraction of the steps."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a step count or a fraction, got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return v


SPARSITY_FLAGS = {
    # flag dest: RettnConfig field
    "keep": "keep", "pattern": "pattern", "block_size": "block_size", "warmup": "warmup",
    "refresh_interval": "refresh_interval", "dense_final": "dense_final", "ramp": "ramp",
    "reselect": "reselect", "min_seq_len": "min_seq_len", "backend": "backend",
    "residual_dtype": "residual_dtype",
}


def _flag(dest: str) -> str:
    """An argparse dest as the user types it: ``no_rho`` -> ``--no-rho``."""
    return "--" + dest.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rettn", description="Re-ttention sparse attention for diffusion transformers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    g = sub.add_parser(
        "generate",
        help="generate images or videos, sparse (default) or dense",
        description="Generate with a diffusers pipeline made sparse by rettn. Without --model the "
        "embedded tiny video model (coloured shapes, 4 frames of 32x32) runs offline.",
    )
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the text prompt")
    src.add_argument("--prompts", metavar="FILE", help="a file with one prompt per line; each output is named after its line")
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--model", default=None, help="Hub id or local pipeline folder (default: the embedded model)")
    g.add_argument("--preset", default=None, help="rettn preset (default: the model family's first preset)")
    s = g.add_argument_group("sparsity and schedule (override the preset)")
    s.add_argument("--keep", type=float, help="fraction of key blocks kept per query block, (0, 1]")
    s.add_argument("--pattern", choices=["topk", "window", "frame_window"])
    s.add_argument("--block-size", type=_positive_int)
    s.add_argument("--warmup", type=_steps_value, help="dense warm-up steps (int) or fraction (float)")
    s.add_argument("--refresh-interval", type=_steps_value, help="a cache step every N steps (int) or fraction")
    s.add_argument("--dense-final", type=_steps_value, help="trailing dense steps (int) or fraction")
    s.add_argument("--ramp", type=float, help="the paper's lambda (default 0.04)")
    s.add_argument("--reselect", choices=["cache", "step"])
    s.add_argument("--min-seq-len", type=int)
    s.add_argument("--backend", choices=["triton", "torch", "flex"])
    s.add_argument("--residual-dtype", choices=["float32", "float16", "bfloat16"])
    s.add_argument("--no-rho", action="store_true", help="do not rescale by rho (residual only: DiTFastAttn-style)")
    s.add_argument("--no-residual", action="store_true", help="do not add the cached residual R")
    r = g.add_argument_group("generation")
    r.add_argument("--steps", type=_positive_int, help="denoising steps (default: the pipeline's)")
    r.add_argument("--seed", type=int, default=0, help="seed; with --prompts, line i uses seed + i")
    r.add_argument("--height", type=_positive_int)
    r.add_argument("--width", type=_positive_int)
    r.add_argument("--frames", type=_positive_int, help="number of frames (video models)")
    r.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    r.add_argument("--dense", action="store_true", help="baseline run without rettn")
    r.add_argument("--compare", action="store_true", help="also run dense with the same seed; write both side by side; print PSNR/SSIM/LPIPS and the speedup")
    r.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    r.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    o = g.add_argument_group("output")
    o.add_argument("--out", default=None, help="output file (.png/.jpg images, .mp4/.gif videos); with --prompts a folder (default: outputs/)")
    o.add_argument("--format", default=None, help="with --prompts: file extension of each output (default .gif for video, .png for images)")
    o.add_argument("--fps", type=_positive_int, default=8)
    o.add_argument("--upscale", type=_positive_int, default=1, help="enlarge outputs by this factor (nearest neighbour)")
    o.add_argument("--json", default=None, metavar="FILE", help="also write a JSON summary")
    o.add_argument("--no-progress", action="store_true", help="hide progress bars")

    from rettn.tools import evaluate
    from rettn.tools.profile import profiler

    evaluate.register(sub)
    profiler.register(sub)
    return parser


# ---------------------------------------------------------------------------------- helpers
def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise CLIError(f"unknown device {name!r}; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda was asked for, but torch sees no CUDA GPU on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise CLIError(f"unsupported device {name!r}; use cpu or cuda")
    return dev


def _check_backend(backend: str | None, device: torch.device, source: str = "--backend triton") -> None:
    """Fail before anything runs when the Triton backend cannot run on ``device``: the same rule as
    :func:`rettn.ops._triton.unsupported_reason` (CUDA tensors, or CPU tensors under
    ``TRITON_INTERPRET=1``), told in terms of the command's flags."""
    if backend != "triton":
        return
    from rettn.ops.attention import triton_installed

    if not triton_installed():
        raise CLIError(f"{source} needs the triton package (pip install triton); or use --backend torch or flex")
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"  # as triton_sparse.interpreting()
    if device.type != "cuda" and not (interpreting and device.type == "cpu"):
        raise CLIError(f"{source} needs a CUDA device, but this run is on --device {device.type}: use --device cuda "
                       "on a machine with a GPU, or --backend torch or flex (or set TRITON_INTERPRET=1 to run "
                       "Triton's CPU interpreter)")


def _check_output(path, flag: str, folder: bool = False) -> None:
    """Fail before any model loads if ``path`` (a file, or with ``folder=True`` a folder) cannot be
    written: what exists of it must be folders, the deepest of them writable, and a file path must
    not name a folder. Nothing is created here; missing folders are made when the output is written."""
    path = Path(path)
    try:
        if not folder and path.is_dir():
            raise CLIError(f"cannot write {flag} '{path}': it is a folder; give a file name")
        here = path if folder else path.parent
        existing = next((p for p in (here, *here.parents) if p.exists()), None)
        if existing is None:  # only when the working folder itself is gone
            raise CLIError(f"cannot write {flag} '{path}': none of its folders exists")
        if not existing.is_dir():
            raise CLIError(f"cannot write {flag} '{path}': '{existing}' is not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise CLIError(f"cannot write {flag} '{path}': the folder '{existing}' is not writable")
    except OSError as e:
        raise CLIError(f"cannot write {flag} '{path}': {e.strerror or e}") from None


def _write_failed(path, flag: str, e: OSError) -> CLIError:
    """The one-line error for an OSError met while writing ``path`` (the up-front check passed,
    but the disk said no: a full disk, a folder that changed meanwhile)."""
    try:
        _check_output(path, flag)
    except CLIError as err:
        return err
    return CLIError(f"cannot write {flag} '{path}': {e.strerror or e}")


def _write_media(path, data, is_video: bool, args) -> None:
    try:
        media.write(path, data, is_video, fps=args.fps, upscale=args.upscale)
    except OSError as e:
        raise _write_failed(path, "--out", e) from None


def write_json(path, data, flag: str = "--json") -> None:
    """Write ``data`` as JSON to ``path``, creating its folder; an OSError is a one-line CLIError."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2, default=str))
    except OSError as e:
        raise _write_failed(path, flag, e) from None


def _read_prompts(args) -> list[tuple[int, str]]:
    """(line number from 1, prompt) pairs; blank lines are skipped."""
    if args.prompt is not None:
        if not args.prompt.strip():
            raise CLIError("--prompt is empty")
        return [(0, args.prompt)]
    path = Path(args.prompts)
    if not path.is_file():
        raise CLIError(f"--prompts file '{path}' does not exist")
    items = [(i, line.strip()) for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    if not items:
        raise CLIError(f"--prompts file '{path}' holds no prompt")
    return items


def _config(args, pipe) -> tuple[RettnConfig, str]:
    from rettn.tools.models import default_preset

    preset = args.preset if args.preset is not None else default_preset(pipe)
    overrides = {field: getattr(args, dest) for dest, field in SPARSITY_FLAGS.items() if getattr(args, dest) is not None}
    if args.no_rho:
        overrides["use_rho"] = False
    if args.no_residual:
        overrides["use_residual"] = False
    if preset is None:
        return RettnConfig.from_dict(overrides), "defaults"
    return RettnConfig.from_preset(preset, **overrides), preset


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


_HELPER_PACKAGES = ("torch", "numpy", "contextlib", "functools")


def _is_rettn_module(name: str) -> bool:
    """rettn's own code; the embedded pipeline (``rettn.tiny``) counts as a pipeline, not as rettn."""
    return (name == "rettn" or name.startswith("rettn.")) and not (name == "rettn.tiny" or name.startswith("rettn.tiny."))


def _raised_by_rettn(e: BaseException) -> bool:
    """Whether ``e`` is rettn's own error rather than the pipeline's: an exception class of rettn's,
    or one raised in rettn code (the innermost frame outside torch / numpy / the standard helpers)."""
    if _is_rettn_module(type(e).__module__ or ""):
        return True
    frames, tb = [], e.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        module = frame.f_globals.get("__name__") or ""
        if module.split(".")[0] in _HELPER_PACKAGES:
            continue
        return _is_rettn_module(module)
    return False


def _run(pipe, kwargs, device):
    """(first output as float array, seconds)."""
    _sync(device)
    t = time.perf_counter()
    try:
        out = pipe(**kwargs)
    except ValueError as e:
        if _raised_by_rettn(e):  # rettn's own check (config, schedule, ...): its message as it is
            raise CLIError(str(e)) from None
        # the pipeline's own input checks (sizes, frames)
        raise CLIError(f"{type(pipe).__name__} rejected the request: {e}") from None
    _sync(device)
    seconds = time.perf_counter() - t
    data = out.frames[0] if hasattr(out, "frames") else out.images[0]
    return data, seconds


# ---------------------------------------------------------------------------------- generate
def generate(args) -> dict:
    from accelerate import PartialState

    from rettn.diffusers.integration import apply_rettention
    from rettn.tools.models import ModelLoadError, load_pipeline

    if args.dense and args.compare:
        raise CLIError("--dense and --compare cannot be combined (--compare already runs the dense baseline)")
    used = [_flag(dest) for dest in SPARSITY_FLAGS if getattr(args, dest) is not None] + (
        ["--no-rho"] if args.no_rho else []) + (["--no-residual"] if args.no_residual else [])
    if args.dense and (used or args.preset):
        raise CLIError(f"--dense runs without rettn; drop the sparsity options ({', '.join(used or ['--preset'])})")
    if args.preset is not None:
        load_preset(args.preset)  # unknown preset: fail before loading anything
    if args.no_progress:
        quiet_progress_bars()
    state = PartialState()
    device = _device(args.device) if state.num_processes == 1 or args.device == "cpu" else state.device
    _check_backend(args.backend, device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    items = _read_prompts(args)
    many = args.prompts is not None
    # Where the outputs go: checked now, not after the whole generation.
    if many:
        out_dir = Path(args.out or "outputs")
        if out_dir.suffix and out_dir.suffix.lower() in media.IMAGE_EXTS + media.VIDEO_EXTS:
            raise CLIError(f"with --prompts, --out is a folder, not a file ('{out_dir}')")
        _check_output(out_dir, "--out", folder=True)
    elif args.out is not None:
        _check_output(args.out, "--out")
    else:
        _check_output(Path("."), "--out", folder=True)  # the default file goes to the working folder
    if args.json:
        _check_output(args.json, "--json")

    try:
        pipe = load_pipeline(args.model, device=str(device), dtype=dtype)
    except ModelLoadError as e:
        raise CLIError(str(e)) from None
    pipe.set_progress_bar_config(disable=args.no_progress or not state.is_local_main_process, leave=False)
    is_video = _is_video(pipe)
    config, preset = (None, None) if args.dense else _config(args, pipe)
    if config is not None and args.backend is None:  # the preset's backend, before any step runs
        _check_backend(config.backend, device, source=f"preset '{preset}' sets backend triton, which")

    if many:
        ext = args.format or (".gif" if is_video else ".png")
        ext = ext if ext.startswith(".") else "." + ext
        targets = {i: out_dir / f"{i:04d}-{media.slug(p)}{ext}" for i, p in items}
    else:
        out = Path(args.out or ("rettn_out.gif" if is_video else "rettn_out.png"))
        ext = out.suffix
        targets = {items[0][0]: out}
    try:
        media.check_extension(next(iter(targets.values())), is_video)
    except ValueError as e:
        raise CLIError(str(e)) from None

    lpips_model, lpips_note = None, None
    if args.compare:
        from rettn.tools.metrics import LPIPS

        try:
            lpips_model = LPIPS.load()
        except RuntimeError as e:
            lpips_note = str(e)

    from tqdm.auto import tqdm

    results, skipped, t0 = [], 0, time.perf_counter()
    with state.split_between_processes(items) as mine:
        bar = tqdm(mine, desc=f"prompts[{state.process_index}]", position=state.process_index,
                   disable=args.no_progress or len(items) <= 1, leave=False)
        for index, prompt in bar:
            target = targets[index]
            if many and target.exists():
                skipped += 1
                continue
            seed = args.seed + (index if many else 0)
            results.append(_generate_one(args, pipe, prompt, seed, target, device, is_video, config,
                                         lpips_model, lpips_note, apply_rettention))
    summary = _summarise(state, results, skipped, time.perf_counter() - t0, preset, config)
    if args.json and state.is_main_process:
        write_json(args.json, summary)
    return summary


def _generate_one(args, pipe, prompt, seed, target, device, is_video, config, lpips_model, lpips_note, apply):
    from rettn.tools.metrics import compare

    record = {"prompt": prompt, "seed": seed, "output": str(target)}
    if args.dense:
        data, record["seconds"] = _run(pipe, _call_kwargs(args, pipe, prompt, seed, device), device)
    else:
        if args.compare:
            dense, record["dense_seconds"] = _run(pipe, _call_kwargs(args, pipe, prompt, seed, device), device)
        try:
            handle = apply(pipe, config)
        except (ValueError, TypeError) as e:
            raise CLIError(str(e)) from None
        try:
            data, record["seconds"] = _run(pipe, _call_kwargs(args, pipe, prompt, seed, device), device)
            stats = handle.stats()
        finally:
            handle.remove()
        record["density"] = stats.mean_density()
        record["steps"] = stats.counts()
    _write_media(target, data, is_video, args)
    if args.compare:
        q = compare(dense, data, lpips_model)
        record.update(q)
        both = target.with_name(f"{target.stem}-compare{target.suffix}")
        _write_media(both, media.side_by_side(dense, data), is_video, args)
        record["compare_output"] = str(both)
        lp = f"LPIPS {q['lpips']:.4f}" if q["lpips"] is not None else lpips_note
        speed = record["dense_seconds"] / record["seconds"]
        print(f"{target.name}: PSNR {q['psnr']:.2f} dB, SSIM {q['ssim']:.4f}, {lp}; dense {record['dense_seconds']:.2f} s, "
              f"rettn {record['seconds']:.2f} s, speedup {speed:.2f}x; side by side (dense | rettn): {both}")
        record["speedup"] = speed
    return record


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


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            generate(args)
        elif args.command == "eval":
            from rettn.tools import evaluate

            evaluate.run(args)
        elif args.command == "profile":
            from rettn.tools.profile import profiler

            return profiler.run(args)
    except CLIError as e:
        print(f"rettn: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as e:  # config / preset validation: already one clear sentence
        print(f"rettn: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    # `python -m rettn.tools.cli`: run the package's module, not this __main__ copy of it, so that the
    # CLIError that eval and profile import from rettn.tools.cli is the class main() catches.
    from rettn.tools.cli import main as _main

    sys.exit(_main())
