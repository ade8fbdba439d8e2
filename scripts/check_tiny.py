#!/usr/bin/env python
"""What has rettn's embedded model (rettn.tiny) learned? Generates a clip for every caption and
seed and reads back from the pixels:

- colour: mean colour of the foreground -> nearest palette colour;
- direction: motion of the foreground's centroid from the first to the last frame;
- shape: fill ratio of the largest blob's bounding box (circle ~0.785, square 1, triangle ~0.5),
  median over the frames -> nearest shape.

The same read-out runs first on 96 training clips (a check of the read-out itself).

    python scripts/check_tiny.py                                 # shipped weights, 48 captions x 2 seeds
    python scripts/check_tiny.py --model DIR --seeds 0           # a save_pretrained folder
    python scripts/check_tiny.py --ckpt /tmp/rettn_train_tiny/seed0.pt   # EMA of a training checkpoint
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from rettn.tiny.pipeline import BACKGROUND, COLOURS, DIRECTIONS, SHAPES, all_captions  # noqa: E402

FILL = {"circle": 0.785, "square": 1.0, "triangle": 0.5}  # of each shape's bounding box, exact shapes


def largest_component(m: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (drops speckles)."""
    seen = np.zeros_like(m, dtype=bool)
    best = []
    H, W = m.shape
    for y0, x0 in zip(*np.nonzero(m)):
        if seen[y0, x0]:
            continue
        comp, stack = [], [(y0, x0)]
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            comp.append((y, x))
            for yy, xx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= yy < H and 0 <= xx < W and m[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    stack.append((yy, xx))
        if len(comp) > len(best):
            best = comp
    out = np.zeros_like(m, dtype=bool)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def analyse(clip: np.ndarray, fg_thresh: float = 0.25, min_move: float = 2.0) -> dict:
    """clip: (F, H, W, 3) in [0, 1] -> predicted colour, direction, shape and diagnostics."""
    bg = np.array(BACKGROUND)
    dist = np.linalg.norm(clip - bg, axis=-1)  # (F, H, W)
    mask = dist > fg_thresh
    res = {"fg_frac": float(mask.mean())}
    if mask.sum() == 0:
        return {**res, "colour": None, "direction": None, "shape": None}
    mean_rgb = clip[mask].mean(0)
    names = list(COLOURS)
    cd = [np.linalg.norm(mean_rgb - np.array(COLOURS[n])) for n in names]
    res["colour"] = names[int(np.argmin(cd))]
    res["colour_dist"] = float(min(cd))
    cents, fills = [], []
    # shape: a stricter mask (half way between background and the palette colour), largest blob
    strong = dist > 0.5 * np.linalg.norm(np.array(COLOURS[res["colour"]]) - bg)
    for f in range(clip.shape[0]):
        m = mask[f]
        if m.sum() == 0:
            cents.append(None)
            continue
        ys, xs = np.nonzero(m)
        cents.append((xs.mean(), ys.mean()))
        blob = largest_component(strong[f])
        if blob.sum() >= 9:
            ys, xs = np.nonzero(blob)
            fills.append(blob.sum() / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)))
    if cents[0] is None or cents[-1] is None:
        res["direction"] = None
    else:
        d = np.array(cents[-1]) - np.array(cents[0])
        res["displacement"] = d.round(2).tolist()
        if np.linalg.norm(d) < min_move:
            res["direction"] = None
        else:
            dn = list(DIRECTIONS)
            res["direction"] = dn[int(np.argmax([d @ np.array(DIRECTIONS[k]) for k in dn]))]
    if fills:
        fill = float(np.median(fills))
        res["fill"] = round(fill, 3)
        res["shape"] = min(FILL, key=lambda s: abs(FILL[s] - fill))
    else:
        res["shape"] = None
    return res


def parse_caption(c: str):
    w = c.split()
    return w[1], w[2], w[4]


def score(rows):
    n = len(rows)
    acc = {k: sum(r[k] == r["true_" + k] for r in rows) / n for k in ("colour", "direction", "shape")}
    acc["all3"] = sum(all(r[k] == r["true_" + k] for k in ("colour", "direction", "shape")) for r in rows) / n
    acc["colour+direction"] = sum(r["colour"] == r["true_colour"] and r["direction"] == r["true_direction"]
                                  for r in rows) / n
    return acc


def confusion(rows, key, labels):
    m = {t: {p: 0 for p in list(labels) + [None]} for t in labels}
    for r in rows:
        m[r["true_" + key]][r[key]] += 1
    return {t: {str(p): v for p, v in row.items() if v} for t, row in m.items()}


def load_pipe(args):
    from rettn.tiny import load_default_pipeline
    from rettn.tiny.pipeline import TinyVideoPipeline, build_pipeline

    if args.ckpt:
        state = torch.load(args.ckpt, map_location="cpu", weights_only=False)
        r = state["recipe"]
        pipe = build_pipeline(r["layers"], r["heads"], r["head_dim"], seed=r["seed"])
        pipe.transformer.load_state_dict(state["ema" if not args.raw else "model"])
        pipe.transformer.eval()
        print(f"checkpoint {args.ckpt} at iteration {state['iter']}")
    elif args.model:
        pipe = TinyVideoPipeline.from_pretrained(args.model)
    else:
        pipe = load_default_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv=None) -> dict:
    """Runs the check; returns the accuracies (and the read-out's on training clips, unless
    --skip-gt)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--raw", action="store_true", help="with --ckpt: the raw weights, not the EMA")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--captions", type=int, default=0, help="first N of a fixed shuffle of all captions (0: all)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--png", default=None, help="write a grid of the first 24 clips here")
    ap.add_argument("--json", default=None, help="write the accuracies and every clip's read-out here")
    ap.add_argument("--skip-gt", action="store_true")
    ap.add_argument("--shift", type=float, default=None, help="override the scheduler's shift")
    args = ap.parse_args(argv)
    result = {}
    torch.set_num_threads(args.threads)

    if not args.skip_gt:
        from train_tiny import make_batch

        gt_rows = []
        for it in range(12):
            x, caps, *_ = make_batch(12345, it, 8)
            for clip, cap in zip(((x + 1) / 2).permute(0, 1, 3, 4, 2).numpy(), caps):
                c, s, d = parse_caption(cap)
                gt_rows.append({**analyse(clip), "true_colour": c, "true_shape": s, "true_direction": d})
        result["training_clips"] = score(gt_rows)
        print("metrics on 96 ground-truth training clips:", json.dumps(result["training_clips"]))
        fills = {s: [r["fill"] for r in gt_rows if r["true_shape"] == s] for s in SHAPES}
        print("  training clips' fill by shape (mean, sd):",
              {s: (round(float(np.mean(v)), 3), round(float(np.std(v)), 3)) for s, v in fills.items()})

    pipe = load_pipe(args)
    if args.shift is not None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=args.shift)
    caps = all_captions()
    rng = np.random.RandomState(0)
    order = rng.permutation(len(caps))
    caps = [caps[i] for i in order]
    if args.captions:
        caps = caps[: args.captions]
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(c, s) for s in seeds for c in caps]
    kw = {} if args.guidance is None else {"guidance_scale": args.guidance}

    rows, clips = [], []
    t0 = time.perf_counter()
    for i in range(0, len(jobs), args.batch):
        chunk = jobs[i : i + args.batch]
        gens = [torch.Generator().manual_seed(s) for _, s in chunk]
        out = pipe([c for c, _ in chunk], num_inference_steps=args.steps, generator=gens, **kw).frames
        for (c, s), clip in zip(chunk, out):
            col, shp, dr = parse_caption(c)
            rows.append({"caption": c, "seed": s, **analyse(clip), "true_colour": col, "true_shape": shp,
                         "true_direction": dr})
            clips.append(clip)
    dt = time.perf_counter() - t0
    acc = result["accuracy"] = score(rows)
    per_clip = dt / len(jobs)
    print(f"{len(jobs)} clips ({len(caps)} captions x {len(seeds)} seeds), {args.steps} steps, "
          f"guidance {kw.get('guidance_scale', 'default')}: {per_clip:.2f} s/clip (batches of {args.batch})")
    print("accuracy:", json.dumps({k: round(v, 3) for k, v in acc.items()}))
    print("direction confusion:", json.dumps(confusion(rows, "direction", list(DIRECTIONS))))
    print("colour confusion:", json.dumps(confusion(rows, "colour", list(COLOURS))))
    print("shape confusion:", json.dumps(confusion(rows, "shape", list(SHAPES))))
    print("mean fg fraction:", round(float(np.mean([r["fg_frac"] for r in rows])), 3),
          " fill by true shape:",
          {s: round(float(np.mean([r["fill"] for r in rows if r["true_shape"] == s and "fill" in r])), 3)
           for s in SHAPES if any(r["true_shape"] == s and "fill" in r for r in rows)})
    fill = {s: [r["fill"] for r in rows if r["true_shape"] == s and "fill" in r] for s in SHAPES}
    if fill.get("square") and fill.get("circle"):
        # how well fill alone tells the model's squares from its circles, whatever their corners
        auc = np.mean([(a > b) + 0.5 * (a == b) for a in fill["square"] for b in fill["circle"]])
        print(f"square vs circle: P(fill of a square > fill of a circle) = {auc:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"accuracy": acc, "per_clip_s": per_clip, "args": vars(args),
                                               "rows": rows}, indent=1, default=str))
    if args.png:
        from PIL import Image

        n = min(len(clips), 24)
        grid = np.concatenate([np.concatenate(list(clips[k]), axis=1) for k in range(n)], axis=0)
        Image.fromarray((grid * 255).round().astype(np.uint8)).resize(
            (grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(args.png)
        print("samples:", args.png, "(rows:", [f"{r['caption']}/{r['seed']}" for r in rows[:n]], ")")
    return result


if __name__ == "__main__":
    main()
