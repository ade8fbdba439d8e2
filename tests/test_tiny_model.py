"""rettn's embedded default model (rettn.tiny): loads offline, generates deterministically, and
has learned its captions (colour, motion direction and shape)."""

import numpy as np
import pytest
import torch

import rettn.tiny
from rettn.tiny.pipeline import BACKGROUND, COLOURS, DIRECTIONS, TinyVideoPipeline

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

# (caption, seed) cases: all 8 right in colour and direction on the shipped weights (and all 96 of
# 48 captions x seeds 0, 1 at 30 steps); the test allows one miss
CASES = [
    ("a red circle moving right", 0),
    ("a green square moving left", 1),
    ("a blue triangle moving up", 2),
    ("a yellow circle moving down", 3),
    ("a red triangle moving down", 4),
    ("a green circle moving up", 5),
    ("a blue square moving right", 6),
    ("a yellow triangle moving left", 7),
]
LEARNED_STEPS = 8  # well above the fewest steps that work (5), well below the default (30)


def seeds(*values):
    return [torch.Generator().manual_seed(v) for v in values]


def analyse(clip):
    """clip (F, H, W, 3) in [0, 1] -> (nearest palette colour of the foreground, direction of the
    foreground centroid from the first to the last frame, or None)."""
    mask = np.linalg.norm(clip - np.array(BACKGROUND), axis=-1) > 0.25
    if not mask[0].any() or not mask[-1].any():
        return None, None
    mean = clip[mask].mean(0)
    colour = min(COLOURS, key=lambda c: np.linalg.norm(mean - np.array(COLOURS[c])))
    first, last = (np.array(np.nonzero(m)[::-1]).mean(1) for m in (mask[0], mask[-1]))  # (x, y)
    move = last - first
    if np.linalg.norm(move) < 2.0:
        return colour, None
    direction = max(DIRECTIONS, key=lambda d: move @ np.array(DIRECTIONS[d]))
    return colour, direction


@pytest.fixture(scope="module")
def pipe():
    pipe = rettn.tiny.load_default_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_weights_are_small_and_loadable(pipe):
    path = rettn.tiny.default_model_path()
    assert (path / "model_index.json").is_file()
    assert sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) <= 10 * 1024 * 1024
    assert isinstance(pipe, TinyVideoPipeline)
    cfg = pipe.transformer.config
    assert (cfg.in_channels, cfg.out_channels, cfg.patch_size, cfg.temporal_compression_ratio) == (3, 3, 2, 1)
    assert cfg.use_rotary_positional_embeddings and cfg.num_layers > 1 and cfg.num_attention_heads > 1


def test_output_types_shapes_and_ranges(pipe):
    kw = dict(num_inference_steps=2, generator=seeds(0))
    frames = pipe("a red circle moving right", **kw).frames
    assert isinstance(frames, np.ndarray) and frames.shape == (1, 4, 32, 32, 3) and frames.dtype == np.float32
    assert frames.min() >= 0 and frames.max() <= 1
    pt = pipe("a red circle moving right", output_type="pt", **dict(kw, generator=seeds(0))).frames
    assert pt.shape == (1, 4, 3, 32, 32) and 0 <= pt.min() and pt.max() <= 1
    np.testing.assert_array_equal(pt.permute(0, 1, 3, 4, 2).numpy(), frames)
    pil = pipe(["a red circle moving right", "a blue square moving up"], output_type="pil", num_inference_steps=1,
               num_videos_per_prompt=2, num_frames=3, height=16, width=24).frames
    assert len(pil) == 4 and all(len(v) == 3 for v in pil) and pil[0][0].size == (24, 16)


def test_generation_is_deterministic(pipe):
    kw = dict(num_inference_steps=3, output_type="pt")
    a = pipe("a green square moving left", generator=seeds(7), **kw).frames
    b = pipe("a green square moving left", generator=seeds(7), **kw).frames
    c = pipe("a green square moving left", generator=seeds(8), **kw).frames
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_callback_and_progress_bar_switch(pipe):
    seen = []

    def callback(p, step, t, kwargs):
        seen.append((step, float(t), tuple(kwargs["latents"].shape)))
        return {}

    pipe("a red circle moving right", num_inference_steps=3, generator=seeds(0), callback_on_step_end=callback)
    assert [s for s, _, _ in seen] == [0, 1, 2]
    assert seen[0][1] > seen[1][1] > seen[2][1]  # decreasing timesteps, as rettn's step tracker expects
    assert seen[0][2] == (1, 4, 3, 32, 32)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(height=31), "height"),
        (dict(width=0), "width"),
        (dict(num_frames=0), "num_frames"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(output_type="latent"), "output_type"),
        (dict(prompt=["a", 3]), "prompt"),
        (dict(negative_prompt=["", ""]), "negative_prompt"),
        (dict(guidance_scale=-1.0), "guidance_scale"),
    ],
)
def test_invalid_inputs_raise(pipe, kwargs, match):
    kwargs = {"prompt": "a red circle moving right", **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)


def test_learned_colour_and_direction(pipe):
    prompts = [c for c, _ in CASES]
    frames = pipe(prompts, num_inference_steps=LEARNED_STEPS, generator=seeds(*(s for _, s in CASES))).frames
    results = [analyse(clip) for clip in frames]
    colour_ok = sum(r[0] == c.split()[1] for r, (c, _) in zip(results, CASES))
    direction_ok = sum(r[1] == c.split()[4] for r, (c, _) in zip(results, CASES))
    detail = [(c, s, r) for (c, s), r in zip(CASES, results)]
    assert colour_ok >= 7, detail
    assert direction_ok >= 7, detail


def test_save_pretrained_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "copy")
    copy = TinyVideoPipeline.from_pretrained(tmp_path / "copy", local_files_only=True)
    copy.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=3, output_type="pt")
    assert torch.equal(pipe("a blue triangle moving up", generator=seeds(3), **kw).frames,
                       copy("a blue triangle moving up", generator=seeds(3), **kw).frames)


def _fill(clip):
    """Median over frames of the foreground's share of its bounding box: circle ~0.79, square ~1,
    triangle ~0.5 for exact shapes."""
    dist = np.linalg.norm(clip - np.array(BACKGROUND), axis=-1)
    fills = []
    for mask in dist > 0.4:
        if mask.sum() >= 9:
            ys, xs = np.nonzero(mask)
            fills.append(mask.sum() / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)))
    return float(np.median(fills)) if fills else 1.0


def test_learned_shapes(pipe):
    """Shape: triangles come out as triangles (low fill), circles round, and squares squarer than
    circles on average (their corners are soft: measured mean fills at 8 steps on the shipped
    weights: triangle 0.53, circle 0.76, square 0.80; docs/cli.md)."""
    colours, directions = list(COLOURS), list(DIRECTIONS)
    fills = {}
    for shape in ("triangle", "circle", "square"):
        prompts = [f"a {colours[i % 4]} {shape} moving {directions[(i + 1) % 4]}" for i in range(8)]
        frames = pipe(prompts, num_inference_steps=LEARNED_STEPS, generator=seeds(*range(8))).frames
        fills[shape] = [_fill(clip) for clip in frames]
    assert sum(f < 0.68 for f in fills["triangle"]) >= 7, fills
    assert sum(f > 0.68 for f in fills["circle"]) >= 7, fills
    assert np.mean(fills["circle"]) - np.mean(fills["triangle"]) > 0.1, fills
    assert np.mean(fills["square"]) - np.mean(fills["circle"]) > 0.02, fills


def test_check_tiny_script(tmp_path):
    """scripts/check_tiny.py (the numbers in docs/cli.md): its read-out gets every training clip's
    colour, direction and shape right, and it runs on generated clips and writes its report."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "check_tiny.py"
    spec = importlib.util.spec_from_file_location("check_tiny", path)
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    out = tmp_path / "check.json"
    result = check.main(["--captions", "4", "--seeds", "0", "--steps", str(LEARNED_STEPS), "--json", str(out)])
    assert result["training_clips"]["all3"] == 1.0, result
    assert result["accuracy"]["colour+direction"] >= 0.75, result
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4 and all(r["shape"] in ("circle", "square", "triangle") for r in rows), rows
