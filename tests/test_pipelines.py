"""Pipelines as users run them: the step and CFG branch from the pipeline's own signals, several
transformers under one schedule, bare transformers, default presets by variant, and what rettn
must leave alone (SDPA elsewhere in the process)."""

import functools
import threading

import diffusers
import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_inputs, tiny_pipeline, tiny_pipeline_kwargs, tiny_transformer

import rettn
from rettn.core.engine import Engine
from rettn.core.config import RettnConfig

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
SMALL = dict(keep=0.2, block_size=32, warmup=2, refresh_interval=3, min_seq_len=0)


def kinds_for(steps, warm, interval):
    return ["dense" if i < warm else ("cache" if (i - warm) % interval == 0 else "sparse") for i in range(steps)]


def wan22_pipeline(boundary_ratio=0.8):
    """Wan 2.2 A14B's layout: a high-noise `transformer` and a low-noise `transformer_2`."""
    pipe = tiny_pipeline("wan", qk_gain=8.0)
    two = diffusers.WanPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                                transformer=pipe.transformer, transformer_2=tiny_transformer("wan", 1, qk_gain=8.0),
                                scheduler=pipe.scheduler, boundary_ratio=boundary_ratio)
    two.set_progress_bar_config(disable=True)
    return two


def wan_kwargs(steps=8):
    return tiny_pipeline_kwargs("wan", num_inference_steps=steps, output_type="latent", guidance_scale=5.0)


@torch.no_grad()
def test_wan22_both_experts_run_sparse_under_one_schedule():
    pipe = wan22_pipeline()
    originals = {name: dict(m.attn_processors) for name, m in (("t1", pipe.transformer), ("t2", pipe.transformer_2))}
    base = pipe(**wan_kwargs()).frames
    handle = rettn.apply_rettention(pipe, **SMALL)
    out = pipe(**wan_kwargs()).frames
    stats, desc = handle.stats(), handle.describe()
    assert stats.kinds() == kinds_for(8, 2, 3)  # one schedule over the 8 steps, whichever expert runs
    models = [s.models for s in stats.steps]
    assert models[0] == [0] and models[-1] == [1]  # high-noise expert first, low-noise expert last
    for label in ("transformer", "transformer_2"):
        rows = [r for r in desc.rows if r["model"] == label and r["role"] == "self"]
        assert rows and all(r["sparse"] > 0 for r in rows), (label, rows)
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    handle.remove()
    assert all(p is originals["t1"][n] for n, p in pipe.transformer.attn_processors.items())
    assert all(p is originals["t2"][n] for n, p in pipe.transformer_2.attn_processors.items())
    assert torch.equal(pipe(**wan_kwargs()).frames, base)


@torch.no_grad()
def test_cache_context_names_are_the_cfg_branches_and_a_second_call_starts_afresh():
    pipe = tiny_pipeline("wan", qk_gain=8.0)
    handle = rettn.apply_rettention(pipe, **SMALL)
    first = pipe(**wan_kwargs(6)).frames
    branches = {key[1] for key in handle.engine.cache}
    stats = handle.stats()
    second = pipe(**wan_kwargs(6)).frames
    assert branches == {"cond", "uncond"}  # from the pipeline's cache_context, not a guess
    assert all(s.forwards == 2 for s in stats.steps) and stats.kinds() == kinds_for(6, 2, 3)
    assert handle.stats().generations == 2 and torch.equal(first, second)
    handle.remove()


@torch.no_grad()
def test_second_order_scheduler_counts_steps_not_model_calls():
    pipe = tiny_pipeline("pixart", qk_gain=8.0)
    pipe.scheduler = diffusers.HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    handle = rettn.apply_rettention(pipe, **SMALL)
    out = pipe(**tiny_pipeline_kwargs("pixart", num_inference_steps=6, output_type="latent")).images
    stats = handle.stats()
    handle.remove()
    assert stats.num_inference_steps == 6 and stats.kinds() == kinds_for(6, 2, 3)
    assert [s.forwards for s in stats.steps] == [2, 2, 2, 2, 2, 1]  # Heun: 2N - 1 evaluations
    assert torch.isfinite(out).all()


@torch.no_grad()
def test_pipeline_signals_win_over_a_rising_timestep():
    # a pipeline whose scheduler steps while the timestep it passes rises (Z-Image passes
    # (1000 - t) / 1000; inversion loops run the timesteps upwards)
    pipe = tiny_pipeline("pixart", qk_gain=8.0)
    transformer = pipe.transformer
    real_forward = transformer.forward

    @functools.wraps(real_forward)
    def rising(*args, **kwargs):
        kwargs["timestep"] = 1000 - kwargs["timestep"]
        return real_forward(*args, **kwargs)

    transformer.forward = rising
    try:
        handle = rettn.apply_rettention(pipe, **SMALL)
        pipe(**tiny_pipeline_kwargs("pixart", num_inference_steps=8, output_type="latent"))
        stats = handle.stats()
        handle.remove()
    finally:
        del transformer.forward
    assert stats.kinds() == kinds_for(8, 2, 3) and stats.generations == 1


# ------------------------------------------------------------------------- bare transformers
@torch.no_grad()
def run_bare(model, family, timesteps, batch=2):
    return [model(**tiny_inputs(family, model, batch=batch, t=t))[0] for t in timesteps]


def test_bare_transformer_default_config_reads_progress_from_the_timestep():
    model = tiny_transformer("pixart", qk_gain=8.0)
    handle = rettn.apply_rettention(model, block_size=32, min_seq_len=0)  # pixart preset: fractions
    assert handle.preset == "pixart-alpha"
    timesteps = [1000.0 - 50 * i for i in range(20)]  # 20 evenly spaced steps
    outs = run_bare(model, "pixart", timesteps)
    stats = handle.stats()
    handle.remove()
    cfg = RettnConfig.from_preset("pixart-alpha")
    assert stats.kinds() == cfg.schedule(20).kinds(20)  # progress by timestep = progress by step here
    assert stats.counts()["sparse"] > 0 and all(torch.isfinite(o).all() for o in outs)


def test_timesteps_scaled_to_one_give_the_same_steps():
    model = tiny_transformer("flux", qk_gain=8.0)
    kinds = []
    for scale in (1.0, 1e-3):
        handle = rettn.apply_rettention(model, keep=0.2, block_size=32, min_seq_len=0, warmup=0.3, refresh_interval=3)
        run_bare(model, "flux", [scale * (1000.0 - 100 * i) for i in range(10)])
        kinds.append(handle.stats().kinds())
        handle.remove()
    assert kinds[0] == kinds[1] == ["dense"] * 3 + ["cache", "sparse", "sparse"] * 2 + ["cache"]


def test_per_sample_timesteps_in_a_batch_advance_by_the_largest():
    model = tiny_transformer("wan", qk_gain=8.0)
    handle = rettn.apply_rettention(model, **SMALL)
    with torch.no_grad():
        for t in (900.0, 800.0, 700.0, 600.0):
            inputs = tiny_inputs("wan", model, batch=2, t=t)
            inputs["timestep"] = torch.tensor([t, t - 60.0])
            model(**inputs)
    stats = handle.stats()
    handle.remove()
    assert stats.kinds() == ["dense", "dense", "cache", "sparse"] and stats.generations == 1


def test_rising_timesteps_for_families_that_count_up():
    eng = Engine(RettnConfig(keep=0.25, block_size=32, warmup=1, refresh_interval=2, min_seq_len=0),
                 n_layers=1, family="test", rising_timesteps=True, timestep_end=1.0)
    for t in (0.0, 0.25, 0.5, 0.75):
        eng.on_forward(t)
    assert [r.kind for r in eng.records] == ["dense", "cache", "sparse", "cache"] and eng.generations == 1
    eng.on_forward(0.1)  # went back down: a new generation
    assert eng.generations == 2


def test_dense_final_step_count_on_a_bare_transformer_is_an_apply_time_error():
    with pytest.raises(ValueError, match=r"dense_final=2 counts steps from the end, so it needs the number "
                                         r"of steps.*set_num_inference_steps\(N\)"):
        rettn.apply_rettention(tiny_transformer("pixart"), keep=0.2, dense_final=2)
    rettn.apply_rettention(tiny_transformer("pixart"), keep=0.2, dense_final=2, num_inference_steps=10).remove()


# ------------------------------------------------------------------------- presets by variant
def test_default_preset_follows_the_variant():
    assert rettn.describe(tiny_pipeline("pixart-sigma")).preset == "pixart-sigma"
    assert rettn.describe(tiny_pipeline("pixart")).preset == "pixart-alpha"
    model = tiny_transformer("cogvideox")
    assert rettn.describe(model).preset == "cogvideox-2b"
    model.register_to_config(_name_or_path="THUDM/CogVideoX-5b")  # what from_pretrained records
    assert rettn.describe(model).preset == "cogvideox-5b"


def test_explicit_config_or_preset_wins():
    model = tiny_transformer("pixart")
    handle = rettn.apply_rettention(model, preset="pixart-sigma")
    assert handle.preset == "pixart-sigma" and handle.config.keep == RettnConfig.from_preset("pixart-sigma").keep
    handle.remove()
    handle = rettn.apply_rettention(model, RettnConfig(keep=0.5))
    assert handle.preset is None and handle.config.keep == 0.5
    handle.remove()


# ------------------------------------------------------------------------- left alone
@torch.no_grad()
def test_sdpa_in_another_thread_during_a_wrapped_call_is_torchs_own():
    model = tiny_transformer("pixart", qk_gain=8.0)
    q = torch.randn(1, 2, 64, 16)
    expected = F.scaled_dot_product_attention(q, q, q)
    seen = []

    def in_other_thread(module, args):
        box = {}
        th = threading.Thread(target=lambda: box.setdefault("out", F.scaled_dot_product_attention(q, q, q)))
        th.start()
        th.join()
        seen.append(torch.equal(box["out"], expected))

    target = model.transformer_blocks[0].attn1.to_q  # runs inside the wrapped processor call
    hook = target.register_forward_pre_hook(in_other_thread)
    handle = rettn.apply_rettention(model, keep=0.1, block_size=32, min_seq_len=0, warmup=0, refresh_interval=2)
    run_bare(model, "pixart", [900.0, 800.0, 700.0])
    stats = handle.stats()
    handle.remove()
    hook.remove()
    assert seen and all(seen) and stats.kinds() == ["cache", "sparse", "cache"]
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention


@torch.no_grad()
def test_image_to_video_pipeline():
    import numpy as np
    from PIL import Image

    parts = tiny_pipeline("cogvideox-rope", qk_gain=8.0)
    transformer = tiny_transformer("cogvideox-rope", 0, qk_gain=8.0, in_channels=8, max_text_seq_length=226,
                                   sample_height=16, sample_width=24, sample_frames=9)  # image latents concatenated
    pipe = diffusers.CogVideoXImageToVideoPipeline(tokenizer=parts.tokenizer, text_encoder=parts.text_encoder,
                                                   vae=parts.vae, transformer=transformer, scheduler=parts.scheduler)
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray((np.random.RandomState(0).rand(64, 96, 3) * 255).astype("uint8"))

    def kwargs():
        return tiny_pipeline_kwargs("cogvideox-rope", num_inference_steps=6, output_type="latent")

    base = pipe(image=image, **kwargs()).frames
    handle = rettn.apply_rettention(pipe, **SMALL)
    out = pipe(image=image, **kwargs()).frames
    stats = handle.stats()
    handle.remove()
    assert stats.kinds() == kinds_for(6, 2, 3) and stats.mean_density() < 1
    assert torch.isfinite(out).all() and not torch.equal(out, base)
