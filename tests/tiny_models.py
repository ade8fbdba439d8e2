"""Tiny random-weight diffusers models for rettn tests: offline, CPU-fast, seeded.

Nothing here touches the Hub: every model is built from a small config with random weights,
and the pipelines get a T5 text encoder and tokenizer built in memory.

    model = tiny_transformer("flux", seed=0)           # eval mode, float32, CPU
    out = model(**tiny_inputs("flux", model))          # 5-20 ms on one CPU thread
    shape = tiny_shape("flux")                         # token grid, text length, text layout

    pipe = tiny_pipeline("wan")
    frames = pipe(**tiny_pipeline_kwargs("wan")).frames

Families (keys of ``FAMILIES``):

=================  ================================  =========================================
key                model class                       self-attention tokens (default inputs)
=================  ================================  =========================================
cogvideox          CogVideoXTransformer3DModel       [13 text, 3x8x12 video] joint (2B-like)
cogvideox-rope     CogVideoXTransformer3DModel       same, with 3D RoPE on video (5B-like)
pixart             PixArtTransformer2DModel          1x16x20 image; cross-attn to 13 text
hunyuan-dit        HunyuanDiT2DModel                 1x16x20 image; cross-attn to 8+12 text
wan                WanTransformer3DModel             3x8x12 video; cross-attn to 13 text
flux               FluxTransformer2DModel            [13 text, 1x16x20 image] joint
hunyuanvideo       HunyuanVideoTransformer3DModel    [3x8x12 video, 13 text] joint (text last)
ltx-video          LTXVideoTransformer3DModel        3x8x12 video; cross-attn to 13 text
=================  ================================  =========================================

Pipelines (``PIPELINE_FAMILIES``): cogvideox, cogvideox-rope, pixart, pixart-sigma, wan.

``tiny_inputs`` builds its tensors on the CPU from a seeded generator and only then moves them to
the model's device and dtype, so the same seed gives the same inputs on any device. The factories
fork the global RNG, so calling them does not disturb the caller's random state.

Random weights give near-uniform attention (``tiny_transformer(..., qk_gain=8.0)`` sharpens it):
these models test plumbing and exactness, not the quality of a sparse approximation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------

FAMILIES = (
    "cogvideox",
    "cogvideox-rope",
    "pixart",
    "hunyuan-dit",
    "wan",
    "flux",
    "hunyuanvideo",
    "ltx-video",
)

PIPELINE_FAMILIES = ("cogvideox", "cogvideox-rope", "pixart", "pixart-sigma", "wan")

VIDEO_GRID = (3, 8, 12)  # (frames, height, width) in tokens after patchify: 288 tokens
IMAGE_GRID = (1, 16, 20)  # 320 tokens
TEXT_LEN = 13  # awkward on purpose

# dimension of the in-memory text encoder's hidden states (stands in for T5-XXL's 4096)
TEXT_DIM = 32


@dataclasses.dataclass(frozen=True)
class TinyShape:
    """What the default ``tiny_inputs`` of a family look like from inside attention.

    grid: (frames, height, width) of the video/image tokens after patchify.
    text_len: text tokens seen by attention (for Hunyuan-DiT: CLIP + T5 tokens concatenated).
    layout: "joint-text-first" ([text, video] in one sequence), "joint-text-last" ([video, text]),
        or "cross" (self-attention over video only, separate cross-attention to text).
    """

    family: str
    grid: tuple[int, int, int]
    text_len: int
    layout: str

    @property
    def video_tokens(self) -> int:
        f, h, w = self.grid
        return f * h * w


_LAYOUT = {
    "cogvideox": "joint-text-first",
    "cogvideox-rope": "joint-text-first",
    "pixart": "cross",
    "hunyuan-dit": "cross",
    "wan": "cross",
    "flux": "joint-text-first",
    "hunyuanvideo": "joint-text-last",
    "ltx-video": "cross",
}

_IMAGE_FAMILIES = ("pixart", "hunyuan-dit", "flux")

# Hunyuan-DiT's text lengths are fixed by its config (learned padding embedding, pooler)
_HDIT_TEXT_LEN, _HDIT_TEXT_LEN_T5 = 8, 12


def _check_family(family: str, allowed=FAMILIES) -> None:
    if family not in allowed:
        raise ValueError(f"unknown family {family!r}; expected one of {allowed}")


def tiny_shape(family: str) -> TinyShape:
    """Token grid, text length and text layout of ``tiny_inputs(family, tiny_transformer(family))``."""
    _check_family(family)
    grid = IMAGE_GRID if family in _IMAGE_FAMILIES else VIDEO_GRID
    text_len = _HDIT_TEXT_LEN + _HDIT_TEXT_LEN_T5 if family == "hunyuan-dit" else TEXT_LEN
    return TinyShape(family, grid, text_len, _LAYOUT[family])


# --------------------------------------------------------------------------------------------
# Transformers
# --------------------------------------------------------------------------------------------


def _transformer_config(family: str) -> tuple[type, dict[str, Any]]:
    import diffusers

    f, h, w = VIDEO_GRID
    if family in ("cogvideox", "cogvideox-rope"):
        rope = family == "cogvideox-rope"
        return diffusers.CogVideoXTransformer3DModel, dict(
            num_attention_heads=2,
            attention_head_dim=32,  # 3D RoPE splits it 8 (t) + 12 (h) + 12 (w)
            in_channels=4,
            out_channels=4,
            time_embed_dim=32,
            text_embed_dim=TEXT_DIM,
            num_layers=2,
            sample_width=2 * w,  # latent size; the model patchifies by 2
            sample_height=2 * h,
            sample_frames=(f - 1) * 4 + 1,  # pre-VAE frames, see the class docstring
            patch_size=2,
            temporal_compression_ratio=4,
            # without RoPE the sincos table is [max_text_seq_length zeros, video]: the text
            # length must equal it
            max_text_seq_length=TEXT_LEN,
            use_rotary_positional_embeddings=rope,
            use_learned_positional_embeddings=False,
        )
    if family == "pixart":
        return diffusers.PixArtTransformer2DModel, dict(
            num_attention_heads=2,
            attention_head_dim=72,  # as in PixArt-alpha/-sigma
            in_channels=4,
            out_channels=8,  # learned sigma, as in the real model
            num_layers=2,
            cross_attention_dim=144,
            sample_size=32,
            patch_size=2,
            caption_channels=TEXT_DIM,
            norm_type="ada_norm_single",
            num_embeds_ada_norm=1000,
            use_additional_conditions=False,
        )
    if family == "hunyuan-dit":
        return diffusers.HunyuanDiT2DModel, dict(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=4,
            patch_size=2,
            sample_size=32,
            hidden_size=32,
            num_layers=4,  # >= 4 so that the long-skip blocks exist
            mlp_ratio=2.0,
            cross_attention_dim=TEXT_DIM,
            cross_attention_dim_t5=TEXT_DIM,
            pooled_projection_dim=16,
            text_len=_HDIT_TEXT_LEN,
            text_len_t5=_HDIT_TEXT_LEN_T5,
        )
    if family == "wan":
        return diffusers.WanTransformer3DModel, dict(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=24,  # RoPE splits it 8 (t) + 8 (h) + 8 (w)
            in_channels=16,
            out_channels=16,
            text_dim=TEXT_DIM,
            freq_dim=32,
            ffn_dim=64,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=1024,  # max tokens per axis, as in Wan 2.1
        )
    if family == "flux":
        return diffusers.FluxTransformer2DModel, dict(
            patch_size=1,
            in_channels=16,  # 4 latent channels packed 2x2
            num_layers=1,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=TEXT_DIM,
            pooled_projection_dim=16,
            guidance_embeds=True,  # as FLUX.1-dev
            axes_dims_rope=(4, 6, 6),  # sums to the head dim
        )
    if family == "hunyuanvideo":
        return diffusers.HunyuanVideoTransformer3DModel, dict(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=16,
            num_layers=1,
            num_single_layers=1,
            num_refiner_layers=1,
            mlp_ratio=2.0,
            patch_size=2,
            patch_size_t=1,
            text_embed_dim=TEXT_DIM,
            pooled_projection_dim=16,
            guidance_embeds=True,
            rope_axes_dim=(4, 6, 6),  # sums to the head dim
        )
    if family == "ltx-video":
        return diffusers.LTXVideoTransformer3DModel, dict(
            in_channels=8,
            out_channels=8,
            patch_size=1,
            patch_size_t=1,
            num_attention_heads=2,
            attention_head_dim=16,
            cross_attention_dim=32,
            num_layers=2,
            caption_channels=TEXT_DIM,
        )
    raise ValueError(family)


def tiny_transformer(
    family: str, seed: int = 0, *, qk_gain: float = 1.0, **config_overrides: Any
) -> torch.nn.Module:
    """A tiny random-weight transformer of ``family`` in eval mode (float32, CPU).

    qk_gain: multiplies every attention logit by this factor (exactly: q and k are each scaled
        by sqrt(qk_gain) through the affine weights of the q/k norms, or of the q/k projections
        where there is no q/k norm). With the default 1.0 attention is near uniform (normalized
        entropy 0.92-0.99 at ~300 tokens); 8.0 gives a mean max probability of ~0.65 (0.15 for
        PixArt, which has no q/k norm). Sparse-attention tests need peaky attention to see a
        difference between dense and sparse.
    config_overrides: replace entries of the tiny config (e.g. ``num_layers=1``).
    """
    _check_family(family)
    cls, config = _transformer_config(family)
    config.update(config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(**config)
    if qk_gain != 1.0:
        _scale_qk(model, qk_gain)
    return model.eval()


@torch.no_grad()
def _scale_qk(model: torch.nn.Module, gain: float) -> None:
    s = math.sqrt(gain)
    for module in model.modules():
        if not (hasattr(module, "processor") and hasattr(module, "to_q")):
            continue
        pairs = (
            ("norm_q", "to_q"),
            ("norm_k", "to_k"),
            ("norm_added_q", "add_q_proj"),
            ("norm_added_k", "add_k_proj"),
        )
        for norm_name, proj_name in pairs:
            norm = getattr(module, norm_name, None)
            target = norm if norm is not None else getattr(module, proj_name, None)
            if target is None:
                continue
            if getattr(target, "weight", None) is None:
                raise ValueError(f"cannot scale {type(module).__name__}.{norm_name}: no affine weight")
            target.weight.mul_(s)
            if getattr(target, "bias", None) is not None:
                target.bias.mul_(s)


def tiny_inputs(
    family: str,
    model: torch.nn.Module,
    batch: int = 2,
    seed: int = 0,
    *,
    grid: tuple[int, int, int] | None = None,
    text_len: int | None = None,
    t: float = 500.0,
) -> dict[str, Any]:
    """Keyword arguments for ``model(**kwargs)``, as the family's pipeline would pass them:
    :func:`rettn.dummy_inputs.forward_inputs` at the tiny defaults (grid ``tiny_shape(family).grid``,
    ``TEXT_LEN`` text tokens, the last 3 text tokens of samples 1..B-1 padded where the forward
    takes a text mask)."""
    from rettn.dummy_inputs import forward_inputs

    _check_family(family)
    return forward_inputs(family, model, batch, seed, grid=grid if grid is not None else tiny_shape(family).grid,
                          text_len=text_len if text_len is not None else TEXT_LEN, t=t)


_WORDS = (
    "a an the of and in on with to at is red green blue black white yellow circle square "
    "triangle cat dog man woman car tree house sky sea sun moon city night day big small "
    "running flying sitting walking photo video painting bright dark"
).split()


def tiny_tokenizer():
    """A T5 tokenizer from an in-memory vocab of common caption words (the embedded model's
    builder, rettn.tiny.pipeline.build_tokenizer, with this file's word list)."""
    from rettn.tiny.pipeline import build_tokenizer

    return build_tokenizer(_WORDS)


def tiny_text_encoder(vocab_size: int, seed: int = 0, umt5: bool = False):
    """A 2-layer T5 (or UMT5) encoder with d_model = TEXT_DIM (rettn.tiny's builder)."""
    from rettn.tiny.pipeline import build_text_encoder

    return build_text_encoder(vocab_size, seed, umt5=umt5)


# --------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------

# What a tiny pipeline call looks like (pixel sizes; video tokens per call in the comment).
_PIPELINE_CALL = {
    # VAE /4 spatial, /4 temporal; patch 2: 3 x 8 x 12 = 288 video tokens + 226 text (joint)
    "cogvideox": dict(height=64, width=96, num_frames=9),
    "cogvideox-rope": dict(height=64, width=96, num_frames=9),
    # VAE /8; patch 2: 16 x 20 = 320 image tokens; cross-attn to 120 (alpha) / 300 (sigma) text
    "pixart": dict(height=256, width=320),
    "pixart-sigma": dict(height=256, width=320),
    # VAE /4 spatial, /4 temporal; patch (1, 2, 2): 3 x 8 x 12 = 288 video tokens; 512 text (cross)
    "wan": dict(height=64, width=96, num_frames=9),
}


def tiny_pipeline_kwargs(family: str, seed: int = 0, num_inference_steps: int = 3, **overrides) -> dict:
    """Keyword arguments for ``tiny_pipeline(family)(**kwargs)``: 3 steps, CFG on, torch output.

    The text lengths are the pipelines' defaults (CogVideoX 226, PixArt-alpha 120, PixArt-sigma 300,
    Wan 512); pass ``max_sequence_length=...`` to change them (CogVideoX without RoPE needs 226).
    """
    _check_family(family, PIPELINE_FAMILIES)
    kwargs: dict[str, Any] = dict(
        prompt="a red circle",
        num_inference_steps=num_inference_steps,
        output_type="pt",
        generator=torch.Generator().manual_seed(seed),
        **_PIPELINE_CALL[family],
    )
    if family.startswith("pixart"):
        kwargs.update(use_resolution_binning=False, clean_caption=False)
    kwargs.update(overrides)
    return kwargs


def tiny_pipeline(family: str, seed: int = 0, *, qk_gain: float = 1.0):
    """A complete tiny pipeline (tokenizer, T5 encoder, VAE, scheduler, transformer) on CPU.

    Call it with ``pipe(**tiny_pipeline_kwargs(family))`` or any sizes that the VAE and patch
    sizes divide (CogVideoX: H, W multiples of 8, frames 4k+1; PixArt: multiples of 16;
    Wan: multiples of 16, frames 4k+1). ``qk_gain`` is passed to ``tiny_transformer``.
    """
    _check_family(family, PIPELINE_FAMILIES)
    import diffusers

    tokenizer = tiny_tokenizer()
    vocab_size = len(tokenizer)

    if family in ("cogvideox", "cogvideox-rope"):
        text_encoder = tiny_text_encoder(vocab_size, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = diffusers.AutoencoderKLCogVideoX(
                in_channels=3,
                out_channels=3,
                down_block_types=("CogVideoXDownBlock3D",) * 3,
                up_block_types=("CogVideoXUpBlock3D",) * 3,
                block_out_channels=(8, 8, 8),
                latent_channels=4,
                layers_per_block=1,
                norm_num_groups=2,
                temporal_compression_ratio=4,
                sample_height=64,
                sample_width=96,
            ).eval()
        # latent 16 x 24 -> 8 x 12 tokens; sample sizes make height=64, width=96 the defaults
        transformer = tiny_transformer(
            family,
            seed,
            qk_gain=qk_gain,
            max_text_seq_length=226,
            sample_height=16,
            sample_width=24,
            sample_frames=9,
        )
        scheduler = diffusers.CogVideoXDDIMScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            clip_sample=False,
            prediction_type="v_prediction",
            rescale_betas_zero_snr=True,
            set_alpha_to_one=True,
            snr_shift_scale=3.0,
            timestep_spacing="trailing",
        )
        pipe = diffusers.CogVideoXPipeline(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            transformer=transformer,
            scheduler=scheduler,
        )
    elif family in ("pixart", "pixart-sigma"):
        text_encoder = tiny_text_encoder(vocab_size, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = diffusers.AutoencoderKL(
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(8, 8, 8, 8),
                layers_per_block=1,
                latent_channels=4,
                norm_num_groups=2,
                sample_size=256,
            ).eval()
        transformer = tiny_transformer("pixart", seed, qk_gain=qk_gain)
        scheduler = diffusers.DPMSolverMultistepScheduler()
        cls = diffusers.PixArtSigmaPipeline if family == "pixart-sigma" else diffusers.PixArtAlphaPipeline
        pipe = cls(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            transformer=transformer,
            scheduler=scheduler,
        )
    elif family == "wan":
        text_encoder = tiny_text_encoder(vocab_size, seed, umt5=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # two down stages, both temporal: /4 spatial, /4 temporal (real Wan: /8, /4)
            vae = diffusers.AutoencoderKLWan(
                base_dim=4,
                z_dim=16,
                dim_mult=[1, 1, 1],
                num_res_blocks=1,
                temperal_downsample=[True, True],
                scale_factor_spatial=4,
                scale_factor_temporal=4,
            ).eval()
        transformer = tiny_transformer("wan", seed, qk_gain=qk_gain)
        scheduler = diffusers.UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
        )
        pipe = diffusers.WanPipeline(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            transformer=transformer,
            scheduler=scheduler,
        )
    else:  # pragma: no cover
        raise ValueError(family)

    pipe.set_progress_bar_config(disable=True)
    return pipe
