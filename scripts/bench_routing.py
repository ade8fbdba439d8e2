#!/usr/bin/env python
"""What rettn's routing costs on a dense step: the embedded model's transformer, one forward with
the inputs of a real denoising step, timed side by side in one process: without rettn, and with
rettn applied on an all-dense schedule (every self-attention call goes through rettn's
interception and falls back to the model's own attention). Calls interleaved, medians reported,
JSON written.

    python scripts/bench_routing.py                      # CPU, 2 threads, 50 rounds
    python scripts/bench_routing.py --rounds 200 --out bench_results/bench_routing.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rettn  # noqa: E402
from rettn.tiny import load_default_pipeline  # noqa: E402


def captured_inputs(pipe):
    """The transformer's keyword arguments at the middle step of a short generation."""
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((args, dict(kwargs))), with_kwargs=True)
    pipe("a red circle moving right", num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    hook.remove()
    return seen[len(seen) // 2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=50, help="timed calls per variant")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="bench_results/bench_routing.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_default_pipeline()
    pipe.set_progress_bar_config(disable=True)
    model = pipe.transformer
    call_args, call_kwargs = captured_inputs(pipe)
    handle = rettn.apply_rettention(pipe, preset="tiny-shapes", warmup="100%")  # every step dense
    handle.remove()

    def plain():
        with torch.no_grad():
            model(*call_args, **call_kwargs)

    def routed():
        with torch.no_grad():
            model(*call_args, **call_kwargs)

    variants = {"without rettn": (plain, False), "rettn, dense step": (routed, True)}
    times = {name: [] for name in variants}
    handle = None
    for _ in range(3):  # warm-up
        plain()
    for i in range(args.rounds):
        for name, (fn, patched) in variants.items():
            if patched:
                handle = rettn.apply_rettention(pipe, preset="tiny-shapes", warmup="100%")
                handle.set_num_inference_steps(args.rounds + 10)
                handle.engine.begin_forward(0, 0, True, args.rounds + 10)  # a dense step
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
            if patched:
                assert handle.engine.kind == "dense"
                handle.remove()
    med = {name: statistics.median(v) for name, v in times.items()}
    # paired differences (each round times both variants back to back): a bootstrap 95% interval
    # of their median says whether the overhead is above the machine's noise
    diffs = [r - p for p, r in zip(times["without rettn"], times["rettn, dense step"])]
    gen = random.Random(0)
    boot = sorted(statistics.median(gen.choices(diffs, k=len(diffs))) for _ in range(2000))
    ci_ms = (1e3 * boot[50], 1e3 * boot[1949])
    base, routed_s = med["without rettn"], med["rettn, dense step"]
    n_calls = sum(1 for n in rettn.describe(pipe).rows if n["role"] == "self")
    report = dict(
        command=" ".join([sys.executable] + sys.argv), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine(),
        rounds=args.rounds, median_ms={k: 1e3 * v for k, v in med.items()},
        overhead_ms=1e3 * (routed_s - base), paired_median_diff_ms=1e3 * statistics.median(diffs),
        paired_diff_ci95_ms=ci_ms, ratio=routed_s / base, self_attention_calls=n_calls,
        overhead_us_per_attention_call=1e6 * (routed_s - base) / max(1, n_calls),
    )
    print(f"embedded model, one transformer forward (dense step), medians of {args.rounds} interleaved calls, "
          f"{report['threads']} threads:")
    for k, v in report["median_ms"].items():
        print(f"  {k:20s} {v:8.3f} ms")
    print(f"  ratio {report['ratio']:.3f}, overhead {report['overhead_ms']:.3f} ms "
          f"({report['overhead_us_per_attention_call']:.0f} us per self-attention call, {n_calls} per forward)")
    print(f"  paired difference: median {report['paired_median_diff_ms']:.3f} ms, "
          f"95% interval [{ci_ms[0]:.3f}, {ci_ms[1]:.3f}] ms")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
