#!/usr/bin/env python
"""Train rettn's embedded default model (``rettn.tiny``) from scratch, on the CPU.

Data: procedurally generated clips, 4 frames x 32 x 32 pixels (4 x 16 x 16 = 1,024 video tokens
at patch 2): one coloured shape (circle, square or triangle; red, green, blue or yellow) moving
left, right, up or down over a plain dark background along a path centred in the frame (give or
take JITTER pixels), captioned "a red circle moving right"; half extent 8-9 px, 2.5-3 px per frame
(--size, --speed). Every batch is a pure function of (--seed, iteration), so a resumed run sees
the same data.

Model: ``TinyVideoPipeline`` (rettn/tiny/pipeline.py): a pixel-space
``CogVideoXTransformer3DModel`` with 3D RoPE; the T5 text encoder keeps its seeded random
weights (frozen). Objective: rectified flow, as ``FlowMatchEulerDiscreteScheduler`` samples it:
``x_s = (1 - s) x0 + s noise``, the transformer predicts ``noise - x0`` at timestep ``1000 s``;
``s`` is logit-normal pushed towards high noise by the scheduler's shift (3: where the layout,
i.e. position and direction of motion, is decided), mixed with a little uniform ``s`` (for the
low-noise end); captions are dropped to "" with probability --cfg-drop (for CFG). The squared
error is weighted 1 + --edge-weight (4) on a 2 px band around the shape's outline, where a circle
and a square of the same area differ (a few pixels at the corners); with smaller shapes (6.5-7.5
px) and no edge weight the model drew its squares as circles (docs/cli.md). AdamW, linear warm-up
then cosine decay; an EMA of the weights is what gets saved.

    python scripts/train_tiny.py                          # ~30 min on 2 idle CPU cores
    python scripts/train_tiny.py --resume                 # continue from the last checkpoint

The result is saved with ``save_pretrained`` (safetensors) into --out, which must stay <= 10 MB.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rettn.tiny.pipeline import (  # noqa: E402
    BACKGROUND,
    COLOURS,
    DIRECTIONS,
    SHAPES,
    TRAIN_FRAMES,
    TRAIN_HEIGHT,
    TRAIN_WIDTH,
    build_pipeline,
    caption,
)

MAX_FOLDER_BYTES = 10 * 1024 * 1024
JITTER = 2.0  # pixels: how far a clip's path may sit from the frame's centre
SIZE = (8.0, 9.0)  # default range of the shapes' half extent, pixels
SPEED = (2.5, 3.0)  # default range of the speed, pixels per frame
EDGE_BAND = 2.0  # pixels: width of the outline band that --edge-weight emphasises


# ------------------------------------------------------------------------------------ data
def _triangle_sdf(px, py, a, h):
    """Signed distance-like value (exact inside, approximate outside) to an upward isosceles
    triangle centred on its bounding box: apex (0, -h/2), base corners (+-a, h/2)."""
    verts = [(0.0, -h / 2), (a, h / 2), (-a, h / 2)]  # clockwise in image coords (y down)
    d = None
    for (x0, y0), (x1, y1) in zip(verts, verts[1:] + verts[:1]):
        ex, ey = x1 - x0, y1 - y0
        n = math.hypot(ex, ey)
        nx, ny = ey / n, -ex / n  # outward normal for this winding
        dist = (px - x0) * nx + (py - y0) * ny
        d = dist if d is None else torch.maximum(d, dist)
    return d


def render_clip(shape: str, colour: str, direction: str, size: float, speed: float, start: tuple[float, float],
                frames: int = TRAIN_FRAMES, height: int = TRAIN_HEIGHT, width: int = TRAIN_WIDTH):
    """One clip (F, 3, H, W) in [0, 1] and the shape's signed distance per pixel (F, H, W), < 0
    inside. ``size``: half extent in pixels; ``speed``: pixels per frame; ``start``: centre (x, y)
    in frame 0. Edges are anti-aliased (coverage of 0.5 px)."""
    ys = torch.arange(height, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(width, dtype=torch.float32)[None, :] + 0.5
    dx, dy = DIRECTIONS[direction]
    bg = torch.tensor(BACKGROUND).view(3, 1, 1)
    fg = torch.tensor(COLOURS[colour]).view(3, 1, 1)
    out, sdfs = [], []
    for f in range(frames):
        cx, cy = start[0] + dx * speed * f, start[1] + dy * speed * f
        px, py = xs - cx, ys - cy
        if shape == "circle":
            sdf = torch.sqrt(px**2 + py**2) - size
        elif shape == "square":
            half = size * 0.886  # same area as the circle
            sdf = torch.maximum(px.abs(), py.abs()) - half
        elif shape == "triangle":
            a = size * 1.15
            sdf = _triangle_sdf(px, py, a, 2 * a)
        else:
            raise ValueError(shape)
        alpha = (0.5 - sdf).clamp(0, 1)
        out.append(bg * (1 - alpha) + fg * alpha)
        sdfs.append(sdf)
    return torch.stack(out), torch.stack(sdfs)


def sample_clip(gen: torch.Generator, size_range=SIZE, speed_range=SPEED):
    """A random (clip (F, 3, H, W) in [0, 1], caption, signed distance (F, H, W)) from the
    training distribution."""

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand((), generator=gen).item()

    def choice(seq):
        return seq[int(torch.randint(len(seq), (), generator=gen))]

    colour, shape, direction = choice(list(COLOURS)), choice(SHAPES), choice(list(DIRECTIONS))
    size = uniform(*size_range)
    speed = uniform(*speed_range)
    travel = speed * (TRAIN_FRAMES - 1)
    dx, dy = DIRECTIONS[direction]
    # The path is centred in the frame, give or take JITTER pixels: a tiny model learns the
    # captioned shape as a template around a known place (with the start anywhere in the frame,
    # 2,000 iterations taught it colour and motion but not shape).
    cx = TRAIN_WIDTH / 2 - dx * travel / 2 + uniform(-JITTER, JITTER)
    cy = TRAIN_HEIGHT / 2 - dy * travel / 2 + uniform(-JITTER, JITTER)
    x, y = cx, cy
    clip, sdf = render_clip(shape, colour, direction, size, speed, (x, y))
    return clip, caption(colour, shape, direction), sdf


def make_batch(seed: int, it: int, batch: int, size_range=SIZE, speed_range=SPEED):
    """The batch of iteration ``it``: clips (B, F, 3, H, W) in [-1, 1], captions, the shapes'
    signed distances (B, F, H, W) and the generator (for the noise draws that follow)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + it)
    clips, caps, sdfs = zip(*(sample_clip(gen, size_range, speed_range) for _ in range(batch)))
    return torch.stack(clips) * 2 - 1, list(caps), torch.stack(sdfs), gen


def edge_weights(sdf: torch.Tensor, weight: float, band: float = EDGE_BAND) -> torch.Tensor:
    """Per-pixel loss weights (B, F, 1, H, W): 1 everywhere plus ``weight`` on the shape's outline
    (falling linearly to 0 at ``band`` pixels from it). What tells a circle from a square is a few
    pixels at the corners; the plain loss is dominated by the background and the noise."""
    return (1 + weight * (1 - sdf.abs() / band).clamp(min=0)).unsqueeze(2)


# ------------------------------------------------------------------------------------ training
def lr_at(it: int, iters: int, base: float, warmup: int) -> float:
    if it < warmup:
        return base * (it + 1) / warmup
    progress = (it - warmup) / max(1, iters - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """The time shift of ``FlowMatchEulerDiscreteScheduler`` (SD3): more weight on high noise."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "rettn" / "tiny" / "weights"), help="save_pretrained folder")
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema", type=float, default=0.998, help="EMA decay (with the usual (1+n)/(10+n) warm-up)")
    ap.add_argument("--cfg-drop", type=float, default=0.1, help="probability of training on the empty caption")
    ap.add_argument("--uniform-frac", type=float, default=0.5, help="share of noise levels drawn uniformly")
    ap.add_argument("--edge-weight", type=float, default=4.0,
                    help="extra loss weight on the shapes' outlines (0: plain MSE)")
    ap.add_argument("--size", type=float, nargs=2, default=list(SIZE), metavar=("LO", "HI"),
                    help="range of the shapes' half extent in pixels")
    ap.add_argument("--speed", type=float, nargs=2, default=list(SPEED), metavar=("LO", "HI"),
                    help="range of the speed in pixels per frame")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--ckpt", default=None, help="checkpoint file (default: <tmp>/rettn_train_tiny/<seed>.pt)")
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--resume", action="store_true", help="continue from --ckpt if it exists")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    out = Path(args.out)
    ckpt_path = Path(args.ckpt or Path(tempfile.gettempdir()) / "rettn_train_tiny" / f"seed{args.seed}.pt")
    recipe = {k: v for k, v in vars(args).items() if k not in ("out", "ckpt", "resume", "log_every", "ckpt_every")}

    pipe = build_pipeline(args.layers, args.heads, args.head_dim, seed=args.seed)
    model = pipe.transformer.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"transformer: {args.layers} layers, {args.heads} heads x {args.head_dim}, {n_params:,} params; "
          f"text encoder frozen ({sum(p.numel() for p in pipe.text_encoder.parameters()):,} params)", flush=True)

    # the text encoder is frozen: embed every caption (and the empty one) once
    captions = [""] + [caption(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS]
    with torch.no_grad():
        table = pipe.encode_prompt(captions, device="cpu", dtype=torch.float32)
    index = {c: i for i, c in enumerate(captions)}
    rope = pipe.rotary_embedding(TRAIN_FRAMES, TRAIN_HEIGHT, TRAIN_WIDTH, device="cpu")
    shift = float(pipe.scheduler.config.shift)  # train where the sampler spends its steps
    recipe["scheduler_shift"] = shift

    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    start, elapsed = 0, 0.0
    if args.resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if state["recipe"] != recipe:
            print(f"checkpoint {ckpt_path} is for another recipe: {state['recipe']}", file=sys.stderr)
            return 2
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        start, elapsed = state["iter"], state["elapsed"]
        print(f"resumed from {ckpt_path} at iteration {start} ({elapsed / 60:.1f} min done)", flush=True)
    elif args.resume:
        print(f"no checkpoint at {ckpt_path}: starting from scratch", flush=True)

    def save_ckpt(it):
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                    "iter": it, "elapsed": elapsed, "recipe": recipe}, tmp)
        os.replace(tmp, ckpt_path)

    t_last, loss_sum, loss_n = time.perf_counter(), 0.0, 0
    for it in range(start, args.iters):
        x0, caps, sdf, gen = make_batch(args.seed, it, args.batch, args.size, args.speed)
        b = x0.shape[0]
        drop = torch.rand(b, generator=gen) < args.cfg_drop
        text = table[[0 if d else index[c] for c, d in zip(caps, drop.tolist())]]
        sigma = shift_sigmas(torch.sigmoid(torch.randn(b, generator=gen)), shift)  # shifted logit-normal
        uniform = torch.rand(b, generator=gen) < args.uniform_frac
        sigma = torch.where(uniform, torch.rand(b, generator=gen), sigma)
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma.view(b, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        for group in opt.param_groups:
            group["lr"] = lr_at(it, args.iters, args.lr, args.warmup)
        pred = model(hidden_states=xt, encoder_hidden_states=text, timestep=sigma * 1000,
                     image_rotary_emb=rope, return_dict=False)[0]
        w = edge_weights(sdf, args.edge_weight)  # all ones with --edge-weight 0: plain MSE
        loss = (w * (pred - (noise - x0)) ** 2).mean() / w.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + it) / (10 + it))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1

        now = time.perf_counter()
        elapsed += now - t_last
        t_last = now
        done = it + 1
        if done % args.log_every == 0 or done == args.iters:
            rate = elapsed / max(1, done)
            print(f"iter {done:5d}/{args.iters}  loss {loss_sum / loss_n:.4f}  lr {opt.param_groups[0]['lr']:.2e}  "
                  f"{rate:.2f} s/iter  elapsed {elapsed / 60:5.1f} min  eta {(args.iters - done) * rate / 60:5.1f} min",
                  flush=True)
            loss_sum, loss_n = 0.0, 0
        if done % args.ckpt_every == 0 and done < args.iters:
            save_ckpt(done)
    save_ckpt(args.iters)

    # save the EMA weights as the pipeline
    model.load_state_dict(ema.state_dict())
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out), safe_serialization=True)
    (out / "train_recipe.json").write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n")
    size = folder_bytes(out)
    print(f"saved {out} ({size / 1e6:.2f} MB) after {args.iters} iterations, {elapsed / 60:.1f} min of training",
          flush=True)
    if size > MAX_FOLDER_BYTES:
        print(f"error: {out} is {size:,} bytes, over the {MAX_FOLDER_BYTES:,} byte limit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
