"""The adaptive schedule (warmup / refresh_interval "auto") against the hand preset and ``rettn
calibrate``'s schedule on the embedded model: quality against dense (PSNR, SSIM) and cost (dense
and cache steps, seconds per run) over captions held out from the tuning.

    python scripts/adaptive_heldout.py --tune    # tolerances on the 2 calibration captions x 2 seeds
    python scripts/adaptive_heldout.py           # 16 held-out captions x 2 seeds, every arm
    python scripts/adaptive_heldout.py --table docs/measurements/2026-12-05-adaptive/adaptive.json

The calibration captions are the first two of ``rettn.tools.evaluate.DEFAULT_PROMPTS`` (what
``rettn calibrate`` tunes on by default, and what ``--tune`` picks the default tolerance on); the
held-out ones are 16 other captions of the model's training vocabulary. Writes
``<out>/adaptive.json`` (every sample) and ``<out>/adaptive.png`` (PSNR against dense + cache
steps), and prints a markdown table.
"""

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import rettn
from rettn.errors import RettnWarning
from rettn.tiny import load_default_pipeline
from rettn.tiny.pipeline import all_captions
from rettn.tools.evaluate import DEFAULT_PROMPTS
from rettn.tools.metrics import psnr, ssim

CALIBRATION = list(DEFAULT_PROMPTS[:2])
HELD_OUT = [c for c in all_captions() if c not in CALIBRATION][::3][:16]
CALIBRATED = "docs/examples/calibrate/tiny95.yaml"  # rettn calibrate's preset for the embedded model
# A run's cost in dense steps on the GPU, from the H200 profile of CogVideoX-2B (docs/benchmarks.md,
# 2026-12-04, second run: dense / cache / sparse step 620.6 / 661.1 / 312.4 ms); the adaptive
# schedule's measure adds a sparse attention pass over 4 of the 30 heads of each layer at its
# cache steps, estimated (not measured) as 30 layers x 4/30 of the 0.96 ms sparse kernel
STEP_COST = {"dense": 1.0, "cache": 661.1 / 620.6, "sparse": 312.4 / 620.6}
MEASURE_COST = 30 * 0.96 * 4 / 30 / 620.6


def arms(tolerances):
    out = [("hand preset (tiny-shapes)", "tiny-shapes", {}),
           ("rettn calibrate (tiny95.yaml)", CALIBRATED, {})]
    for t in tolerances:
        out.append((f"adaptive, tolerance {t:g}", "tiny-shapes",
                    dict(warmup="auto", refresh_interval="auto", tolerance=t)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tune", action="store_true", help="the calibration captions, not the held-out ones")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--tolerances", type=float, nargs="+", default=[0.07, 0.09, 0.1, 0.15, 0.2])
    ap.add_argument("--out", default="docs/measurements/adaptive")
    ap.add_argument("--table", metavar="JSON", help="only print the table of an earlier run's adaptive.json")
    args = ap.parse_args()
    if args.table:  # (and its chart again, beside it)
        rows = json.loads(Path(args.table).read_text())["rows"]
        print(summary(rows))
        chart(rows, Path(args.table).with_suffix(".png"))
        return
    prompts = CALIBRATION if args.tune else HELD_OUT
    pipe = load_default_pipeline()
    pipe.set_progress_bar_config(disable=True)
    warnings.simplefilter("ignore", RettnWarning)  # the CPU torch path is slower than dense here

    def generate(prompt, seed):
        t0 = time.perf_counter()
        out = pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="np")
        return np.asarray(out.frames[0], dtype=np.float32), time.perf_counter() - t0

    generate(prompts[0], 0)  # first-call costs outside the timings
    rows = []
    for prompt in prompts:
        for seed in args.seeds:
            dense, t_dense = generate(prompt, seed)
            rows.append(dict(arm="dense", prompt=prompt, seed=seed, seconds=t_dense, psnr=None, ssim=None,
                             dense=30, cache=0, sparse=0))
            for name, preset, overrides in arms(args.tolerances):
                handle = rettn.apply_rettention(pipe, preset=preset, **overrides)
                try:
                    out, t = generate(prompt, seed)
                    st = handle.stats()
                finally:
                    handle.remove()
                c = st.counts()
                rows.append(dict(arm=name, prompt=prompt, seed=seed, seconds=t, psnr=psnr(dense, out),
                                 ssim=ssim(dense, out), **c, kinds=st.kind_letters(),
                                 refreshes=[dict(step=r.step, age=r.age, error=r.error, interval=r.interval)
                                            for r in st.refreshes]))
            print(f"{prompt!r} seed {seed}: " + ", ".join(
                f"{r['arm']} {r['psnr']:.2f} dB" for r in rows[-len(args.tolerances) - 2:]), flush=True)

    table = summary(rows)
    print("\n" + table)
    out = Path(args.out) / ("tune" if args.tune else "")
    out.mkdir(parents=True, exist_ok=True)
    (out / "adaptive.json").write_text(json.dumps(dict(prompts=prompts, seeds=args.seeds, rows=rows), indent=1))
    (out / "adaptive.md").write_text(table + "\n")
    chart(rows, out / "adaptive.png")
    print(f"wrote {out}/adaptive.json, adaptive.md, adaptive.png")


def _by_arm(rows):
    arms_ = {}
    for r in rows:
        arms_.setdefault(r["arm"], []).append(r)
    return arms_


def summary(rows) -> str:
    lines = ["| schedule | steps D / C / S (mean) | dense + cache steps | GPU cost (dense steps, modelled) | "
             "PSNR mean (min) dB | SSIM mean | s / run (CPU) |",
             "|---|---|---|---|---|---|---|"]
    for arm, rs in _by_arm(rows).items():
        d, c, s = (np.mean([r[k] for r in rs]) for k in ("dense", "cache", "sparse"))
        measures = np.mean([len(r.get("refreshes", [])) for r in rs])
        gpu = d * STEP_COST["dense"] + c * STEP_COST["cache"] + s * STEP_COST["sparse"] + measures * MEASURE_COST
        q = [r["psnr"] for r in rs if r["psnr"] is not None]
        quality = f"{np.mean(q):.2f} ({min(q):.2f})" if q else "reference"
        ss = f"{np.mean([r['ssim'] for r in rs]):.4f}" if q else "-"
        lines.append(f"| {arm} | {d:.1f} / {c:.1f} / {s:.1f} | {d + c:.1f} | {gpu:.1f} | {quality} | {ss} | "
                     f"{np.mean([r['seconds'] for r in rs]):.2f} |")
    return "\n".join(lines)


def _gpu_cost(r) -> float:
    return (sum(r[k] * STEP_COST[k] for k in STEP_COST) + len(r.get("refreshes", [])) * MEASURE_COST)


def chart(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, cost, label in ((axes[0], lambda r: r["dense"] + r["cache"], "dense + cache steps of 30 (mean)"),
                            (axes[1], _gpu_cost, "GPU cost in dense steps (modelled from the H200 CogVideoX-2B "
                                                 "profile; dense run: 30)")):
        auto = []
        for arm, rs in _by_arm(rows).items():
            if arm == "dense":
                continue
            x, y = np.mean([cost(r) for r in rs]), np.mean([r["psnr"] for r in rs])
            if arm.startswith("adaptive"):
                auto.append((x, y, arm.split()[-1]))
            else:
                ax.scatter([x], [y], s=60, label=arm, zorder=3)
        auto.sort()
        ax.plot([a[0] for a in auto], [a[1] for a in auto], "o-", color="black", label="adaptive (tolerance)")
        for x, y, t in auto:
            ax.annotate(t, (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
        ax.set_xlabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("PSNR vs dense (dB, mean)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Embedded model, held-out captions: schedule cost against quality")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
