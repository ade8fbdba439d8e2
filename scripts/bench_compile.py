#!/usr/bin/env python
"""Does torch.compile add speed on top of rettn's kernels? Whole generations of a real
transformer (random weights), four ways, timed side by side in one process:
dense eager, dense compiled, rettn eager, rettn compiled.

Compiled = regional compilation (each transformer block compiled with fullgraph=True, as
diffusers' ``compile_repeated_blocks`` does); the attention kernels stay rettn's custom ops.
Every variant runs once untimed first (compilation, autotuning, caches), then --repeats timed
generations; the report gives the median seconds per generation and the ratios.

The dense baseline runs on the dense kernel rettn's own dense steps run (``--dense-baseline
fastest``, the default): the one rettn's dense chooser measured fastest in the rettn eager run
(e.g. cuDNN on an H200, where torch's default SDPA picks flash), forced on the model's SDPA with
``torch.nn.attention.sdpa_kernel``; ``--dense-baseline model`` leaves torch's default pick. The
report names it (``dense_backend``), so every ratio says what it is against. Compiled rettn
compiles as many graphs as compiled dense (``rettn::attend`` decides the step kind inside the
op); the report counts both (``graphs``).

Fewer steps than the model's own (e.g. --steps 10 of CogVideoX-2B's 50) keep the preset's
schedule in shape: the warm-up stays a fraction of the steps, the refresh interval keeps its
length in steps at the model's step count (5 of 50), so 10 steps are 3 dense, 2 cache and 5
sparse steps. A schedule without a sparse step is an error (nothing of rettn's would be timed).

    python scripts/bench_compile.py --arch cogvideox-2b --json compile.json        # a GPU
    python scripts/bench_compile.py --arch pixart-sigma --layers 2 --height 256 --width 256 \\
        --steps 6 --compile-backend aot_eager --device cpu                         # a CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import launch_log  # noqa: E402  (scripts/: records kernel launches when RETTN_LAUNCH_LOG is set)
import rettn  # noqa: E402
from rettn.tools.profile import dummy_inputs  # noqa: E402
from rettn.tools.profile.archs import arch_names, build_transformer, load_arch  # noqa: E402
from rettn.core.config import RettnConfig  # noqa: E402
from rettn.tools.args import add_config_flags, config_overrides  # noqa: E402
from rettn.tools.profile.report import environment  # noqa: E402
from rettn.tools.profile.runners import TransformerRunner  # noqa: E402
from rettn.tools.profile.targets import with_heads  # noqa: E402

CONFIG_FIELDS = ("warmup", "refresh_interval", "min_seq_len", "backend")  # flags: rettn.tools.args
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _blocks(model):
    for name in ("transformer_blocks", "blocks", "single_transformer_blocks"):
        for block in getattr(model, name, None) or []:
            yield block


_SDPA_KERNELS = {"sdpa:flash": "FLASH_ATTENTION", "sdpa:cudnn": "CUDNN_ATTENTION",
                 "sdpa:efficient": "EFFICIENT_ATTENTION"}


def forced_kernel(name: str | None):
    """``sdpa_kernel`` forcing torch's SDPA onto rettn's dense kernel ``name`` (``"sdpa:cudnn"``...);
    a no-op for any other name (CPU: the model's SDPA already runs the CPU flash kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = _SDPA_KERNELS.get(name or "")
    return sdpa_kernel([getattr(SDPBackend, backend)]) if backend else contextlib.nullcontext()


def schedule_config(config: RettnConfig, steps: int, model_steps: int) -> RettnConfig:
    """``config`` for a run of ``steps`` steps with the schedule's shape at ``model_steps``: a
    refresh interval given as a fraction becomes its length in steps at ``model_steps``; the
    warm-up and dense_final stay fractions (they scale with the run)."""
    interval = config.refresh_interval
    if isinstance(interval, float) and steps != model_steps:
        config = config.replace(refresh_interval=max(1, int(round(interval * model_steps))))
    return config.replace(num_inference_steps=steps)


def main(argv=None) -> int:
    launch_log.install_from_env()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="cogvideox-2b", choices=arch_names())
    ap.add_argument("--layers", type=int, default=None, help="fewer transformer blocks (default: all)")
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None, help="attention heads instead of the model's (same head dim)")
    ap.add_argument("--text-len", type=int, default=None, help="text tokens (default: the model's)")
    ap.add_argument("--batch", type=int, default=None, help="batch per transformer call (default: the model's)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--preset", default=None, help="rettn preset (default: the model's)")
    add_config_flags(ap, CONFIG_FIELDS, title="rettn (override the preset)")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (inductor, aot_eager, ...)")
    ap.add_argument("--dense-baseline", choices=("fastest", "model"), default="fastest",
                    help="dense variants on the kernel rettn's dense chooser picks (default) or torch's default")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    spec = with_heads(load_arch(args.arch), args.heads)
    grid = spec.token_grid(args.frames, args.height, args.width)
    steps = args.steps or spec.shape.steps
    text_len = args.text_len or spec.shape.text_len
    model = build_transformer(spec, args.layers, device=device, dtype=dtype, text_len=text_len)
    inputs = dummy_inputs.forward_inputs(spec.family, model, batch=args.batch or spec.shape.batch, grid=grid,
                                         text_len=text_len, text_padding=0)
    runner = TransformerRunner(model, spec.family, inputs, spec.shape.calls_per_step)
    overrides = config_overrides(args, CONFIG_FIELDS)
    config = schedule_config(RettnConfig.from_preset(args.preset or spec.preset, **overrides), steps,
                             spec.shape.steps)
    kinds = config.schedule(steps).kinds(steps)
    counts = {kind: kinds.count(kind) for kind in ("dense", "cache", "sparse")}
    if not counts["sparse"]:
        ap.error(f"the schedule at --steps {steps} ({kinds}) has no sparse step: give more --steps or a "
                 "longer --refresh-interval")
    seq = dummy_inputs.sequence_length(spec.family, model.config, grid, text_len)
    print(f"{spec.name}: {sum(1 for _ in _blocks(model))} blocks, grid {grid}, attention seq {seq}, "
          f"{steps} steps ({counts['dense']} dense, {counts['cache']} cache, {counts['sparse']} sparse), "
          f"{dtype}, {device}, compile backend {args.compile_backend}", flush=True)

    def generation():
        _sync(device)
        t0 = time.perf_counter()
        runner.run(steps)
        _sync(device)
        return time.perf_counter() - t0

    results, graphs, dense_kernel = {}, {}, None
    for compiled in (False, True):
        if compiled:
            torch._dynamo.reset()
            for block in _blocks(model):
                block.compile(backend=args.compile_backend, fullgraph=True)
        for mode in ("rettn", "dense"):  # rettn first: its dense chooser names the dense kernel
            handle = rettn.apply_rettention(model, config) if mode == "rettn" else None
            before = counters["stats"]["unique_graphs"]
            forced = dense_kernel if mode == "dense" and args.dense_baseline == "fastest" else None
            # (CPU: torch's SDPA already runs the CPU flash kernel, rettn's "sdpa:cpu")
            baseline = (forced if forced in (*_SDPA_KERNELS, "sdpa:cpu") else "torch default") if mode == "dense" else None
            try:
                try:
                    with forced_kernel(forced):
                        first = generation()  # compiles (compiled) / warms caches (eager): not counted
                        times = [generation() for _ in range(args.repeats)]
                except Exception as e:  # noqa: BLE001 - the forced kernel failed: torch's default, said
                    if forced not in _SDPA_KERNELS:
                        raise
                    print(f"dense on {forced} failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                          "torch's default SDPA instead", flush=True)
                    baseline = f"torch default ({forced} failed)"
                    first = generation()
                    times = [generation() for _ in range(args.repeats)]
                stats = handle.stats() if handle else None
            finally:
                if handle:
                    handle.remove()
            ran = stats.kinds()[-steps:] if stats else None
            if ran is not None and ran != kinds:
                raise RuntimeError(f"the rettn run's step kinds {ran} differ from the schedule's {kinds}")
            if stats is not None and dense_kernel is None:
                dense_kernel = stats.dense_backend
            label = f"{mode} {'compiled' if compiled else 'eager'}"
            results[label] = {"first_s": first, "median_s": statistics.median(times), "runs_s": times,
                              "density": stats.mean_density() if stats else None,
                              "dense_backend": stats.dense_backend if stats else baseline}
            if compiled:
                graphs[mode] = counters["stats"]["unique_graphs"] - before
            print(f"{label:15s} {results[label]['median_s']:8.3f} s per generation (first run {first:.1f} s, "
                  f"dense kernel {results[label]['dense_backend']})", flush=True)
    print(f"graphs compiled: rettn {graphs['rettn']}, dense {graphs['dense']}", flush=True)

    def ratio(a, b):
        return results[a]["median_s"] / results[b]["median_s"]

    ratios = {
        "compile speedup, dense": ratio("dense eager", "dense compiled"),
        "compile speedup, rettn": ratio("rettn eager", "rettn compiled"),
        "rettn speedup, eager": ratio("dense eager", "rettn eager"),
        "rettn speedup, compiled": ratio("dense compiled", "rettn compiled"),
    }
    for name, value in ratios.items():
        print(f"{name:25s} {value:.2f}x")
    if args.json:
        report = {"dense_baseline": args.dense_baseline, "dense_backend": dense_kernel, "graphs": graphs,
                  "arch": spec.name, "grid": list(grid), "seq": seq, "steps": steps, "layers": args.layers,
                  "schedule": {"kinds": kinds, "counts": counts}, "config": dict(vars(config)), "dtype": str(dtype),
                  "compile_backend": args.compile_backend, "results": results, "ratios": ratios,
                  "environment": environment(device), "command": " ".join(sys.argv)}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
