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

Pipelines (``PIPELINE_FAMILIES``): cogvideox, cogvideox-rope, pixart, pixart-sigma, wan;
``ALL_PIPELINE_FAMILIES`` adds wan2.2-a14b (WanPipeline with transformer, transformer_2 and
boundary_ratio 0.875).

Every other transformer class of diffusers 0.42.1 has a data row (``ALL_FAMILIES`` lists every
key; ``tiny_row(key)`` gives the row: class, config, input builder, attention layout, grid, where
the text sits). ``trace_attention(model, kwargs)`` runs a forward under a TorchFunctionMode and
returns every core attention call (module, processor, q/k/v shapes, mask, dispatch or direct).
``FAMILIES`` stays the eight families rettn supports today.

``tiny_inputs`` builds its tensors on the CPU from a seeded generator and only then moves them to
the model's device and dtype, so the same seed gives the same inputs on any device. The factories
fork the global RNG, so calling them does not disturb the caller's random state.

Random weights give near-uniform attention (``tiny_transformer(..., qk_gain=8.0)`` sharpens it):
these models test plumbing and exactness, not the quality of a sparse approximation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

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
# with the pipelines added for issue 12: Wan 2.2 A14B (two experts, boundary_ratio)
ALL_PIPELINE_FAMILIES = PIPELINE_FAMILIES + ("wan2.2-a14b",)
WAN22_BOUNDARY_RATIO = 0.875  # Wan2.2-T2V-A14B's model_index.json

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
    extra_tokens: int = 0
    softmax: bool = True

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


# --------------------------------------------------------------------------------------------
# Every other transformer class of diffusers 0.42.1, as data rows
# --------------------------------------------------------------------------------------------
#
# One row per key: the model class, a tiny config, an input builder (what the class's pipeline
# passes, at a small token grid), and what attention sees (layout, where text sits, how many
# other tokens join the self-attention sequence). The facts were checked by running each model
# under trace_attention(); docs/families-survey.md has the full table.
#
# Input builders take (model, config, batch, randn, grid, text_len, t) and return forward kwargs;
# ``t`` is the denoising time on the 0..1000 scale and each builder converts it to the scale the
# class's pipeline uses (see the row's ``timestep`` field).


@dataclasses.dataclass(frozen=True)
class TinyRow:
    """One tiny model: how to build it and what its attention looks like.

    layout: "joint-text-first" / "joint-text-last" (text and grid tokens in one self-attention
        sequence), "joint-kv-text-first" / "joint-kv-text-last" (queries are the grid tokens only,
        keys and values are [text, grid] / [grid, text]), "cross" (self-attention over grid tokens, text reached by cross-attention),
        "self" (no text at all), or "linear" (no softmax attention on the grid tokens).
    self_attention / cross_attention: regexes over ``model.named_modules()`` names of the modules
        whose attention covers the grid tokens, and of the cross-attention modules.
    extra_tokens: tokens in the self-attention sequence besides the grid and the text
        (reference latents, register / memory tokens, condition frames), placed as ``extra_at``
        says: "after-grid" or "before-grid".
    timestep: what the class's pipeline passes as the timestep ("0..1000", "0..1",
        "(1000-t)/1000", "1000-t", "per-token 0..1000", ...).
    text_arg: the forward argument holding the (main) text embeddings.
    """

    key: str
    model_class: str
    config: dict
    build: Callable[..., dict]
    layout: str
    grid: tuple[int, int, int]
    text_len: int | None
    self_attention: str
    cross_attention: str | None = None
    extra_tokens: int = 0
    extra_at: str = "after-grid"
    timestep: str = "0..1000"
    text_arg: str | None = "encoder_hidden_states"
    softmax: bool = True
    note: str = ""
    text_span: tuple[int, int] | None = None  # (start, stop) of the text in the main call's keys
    self_len: int | None = None  # query length of the main self-attention call
    text_modulates: bool = False  # pooled text modulates the grid tokens (no clean position test)
    via: str = "dispatch"  # how the main call reaches torch: "dispatch" (dispatch_attention_fn) or "direct"
    # zero-initialised weights (regex over parameter names) that gate attention out of the output:
    # redrawn, or attention would have no effect on a random-weight model
    redraw_zero: str | None = None

    @property
    def grid_tokens(self) -> int:
        f, h, w = self.grid
        return f * h * w

    def expected_self_len(self) -> int:
        """Query length of the widest call in ``self_attention`` modules, default inputs."""
        if self.self_len is not None:
            return self.self_len
        n = self.grid_tokens + self.extra_tokens
        if self.layout in ("joint-text-first", "joint-text-last"):
            n += self.text_len or 0
        return n

    def expected_text_span(self) -> tuple[int, int] | None:
        """Where the text sits in the keys of that call (None: no text there)."""
        if self.text_span is not None:
            return self.text_span
        L = self.text_len or 0
        before = self.extra_tokens if self.extra_at == "before-grid" else 0
        if self.layout in ("joint-text-first", "joint-kv-text-first"):
            start = self.extra_tokens if self.extra_at == "text-first" else 0
            return (start, start + L)
        if self.layout in ("joint-text-last", "joint-kv-text-last"):
            return (before + self.grid_tokens, before + self.grid_tokens + L)
        return None


_VG = VIDEO_GRID
_IG = IMAGE_GRID
_SMALL_VG = (3, 6, 8)  # 144 tokens: for models with per-frame extra tokens


def _ts(B, t):
    return torch.full((B,), float(t))


def _ids_2d(h, w, first=0.0):
    ids = torch.zeros(h, w, 3)
    ids[..., 0] = first
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def _ids_4d(f, h, w, t0=0):
    return torch.cartesian_prod(torch.arange(t0, t0 + f), torch.arange(h), torch.arange(w), torch.arange(1)).float()


def _mask(B, L, pad=3):
    from rettn.tools.profile.dummy_inputs import text_mask

    return text_mask(B, L, pad)


# ---- Wan and its relatives (cross-attention to text; grid from (B, C, F, H, W) and patch_size) ----

_WAN = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=24,
    in_channels=16,
    out_channels=16,
    text_dim=TEXT_DIM,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=1024,
)


def _b_c_f_h_w(c, B, r, grid, chans=None, pt=1, p=2):
    f, h, w = grid
    return r(B, chans or c.in_channels, f * pt, h * p, w * p)


def _in_wan_ti2v(m, c, B, r, grid, L, t):
    f, h, w = grid
    # WanPipeline with expand_timesteps (Wan 2.2 TI2V-5B): one timestep per token, (B, F*H*W);
    # for image-to-video the first frame's tokens get 0
    ts = torch.full((B, f * h * w), float(t))
    ts[:, : h * w] = 0.0
    return dict(hidden_states=_b_c_f_h_w(c, B, r, grid), timestep=ts, encoder_hidden_states=r(B, L, c.text_dim))


def _in_wan_i2v(m, c, B, r, grid, L, t):
    return dict(
        hidden_states=_b_c_f_h_w(c, B, r, grid),
        timestep=_ts(B, t),
        encoder_hidden_states=r(B, L, c.text_dim),
        encoder_hidden_states_image=r(B, 9, c.image_dim),  # CLIP tokens (257 in Wan 2.1 I2V)
    )


def _in_wan_plain(m, c, B, r, grid, L, t):
    return dict(hidden_states=_b_c_f_h_w(c, B, r, grid), timestep=_ts(B, t), encoder_hidden_states=r(B, L, c.text_dim))


def _in_wan_vace(m, c, B, r, grid, L, t):
    out = _in_wan_plain(m, c, B, r, grid, L, t)
    out["control_hidden_states"] = _b_c_f_h_w(c, B, r, grid, chans=c.vace_in_channels)
    return out


def _in_wan_animate(m, c, B, r, grid, L, t):
    f, h, w = grid  # f latent frames: 1 reference frame + (f - 1) video frames
    return dict(
        hidden_states=r(B, 2 * c.latent_channels + 4, f, 2 * h, 2 * w),
        timestep=_ts(B, t),
        encoder_hidden_states=r(B, L, c.text_dim),
        encoder_hidden_states_image=r(B, 9, c.image_dim),
        pose_hidden_states=r(B, c.latent_channels, f - 1, 2 * h, 2 * w),
        face_pixel_values=r(B, 3, 4 * (f - 1) - 3 + 4 * 0, c.motion_encoder_size, c.motion_encoder_size),
    )


def _in_skyreels_df(m, c, B, r, grid, L, t):
    f, h, w = grid
    out = _in_wan_plain(m, c, B, r, grid, L, t)
    # diffusion forcing: one timestep per latent frame, (B, F)
    out["timestep"] = torch.linspace(float(t), float(t) / 2, f).repeat(B, 1)
    out["enable_diffusion_forcing"] = True
    return out


def _in_helios(m, c, B, r, grid, L, t):
    f, h, w = grid
    C = c.in_channels
    return dict(
        hidden_states=r(B, C, f, 2 * h, 2 * w),
        timestep=_ts(B, t).long(),
        encoder_hidden_states=r(B, L, c.text_dim),
        indices_hidden_states=torch.arange(f).float().repeat(B, 1),
        indices_latents_history_short=torch.ones(B, 1),
        indices_latents_history_mid=torch.ones(B, 1),
        indices_latents_history_long=torch.ones(B, 4),
        latents_history_short=r(B, C, 1, 2 * h, 2 * w),
        latents_history_mid=r(B, C, 1, 2 * h, 2 * w),
        latents_history_long=r(B, C, 4, 2 * h, 2 * w),
    )


# ---- Flux-like (joint text-first; packed (B, S, C) latents; grid from img_ids) ----

_FLUX_LIKE = dict(
    patch_size=1,
    in_channels=16,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=TEXT_DIM,
    axes_dims_rope=(4, 6, 6),
)


def _in_flux_like(m, c, B, r, grid, L, t, *, pooled=False, guidance=False):
    _, h, w = grid
    out = dict(
        hidden_states=r(B, h * w, c.in_channels),
        encoder_hidden_states=r(B, L, c.joint_attention_dim),
        timestep=_ts(B, t / 1000.0),
        img_ids=_ids_2d(h, w),
        txt_ids=torch.zeros(L, 3),
    )
    if pooled:
        out["pooled_projections"] = r(B, c.pooled_projection_dim)
    if guidance:
        out["guidance"] = torch.full((B,), 3.5)
    return out


def _in_flux_kontext(m, c, B, r, grid, L, t):
    # FluxKontextPipeline: [target latents, reference-image latents] in one sequence; the
    # reference's ids have first coordinate 1
    _, h, w = grid
    out = _in_flux_like(m, c, B, r, grid, L, t, pooled=True, guidance=True)
    out["hidden_states"] = torch.cat([out["hidden_states"], r(B, h * w, c.in_channels)], dim=1)
    out["img_ids"] = torch.cat([_ids_2d(h, w), _ids_2d(h, w, first=1.0)])
    return out


def _in_chroma(m, c, B, r, grid, L, t):
    _, h, w = grid
    out = _in_flux_like(m, c, B, r, grid, L, t)
    # ChromaPipeline: a (B, L + image tokens) mask, text padding masked, image tokens kept
    mask = torch.ones(B, L + h * w, dtype=torch.bool)
    mask[1:, L - 3 : L] = False
    out["attention_mask"] = mask
    return out


def _in_bria(m, c, B, r, grid, L, t):
    out = _in_flux_like(m, c, B, r, grid, L, t)
    out["timestep"] = _ts(B, t)  # BriaPipeline passes t unscaled (the model divides by 1000)
    return out


def _in_bria_fibo(m, c, B, r, grid, L, t):
    out = _in_bria(m, c, B, r, grid, L, t)
    ehs = out["encoder_hidden_states"]
    d = c.text_encoder_dim
    out["text_encoder_layers"] = [r(B, L, d) for _ in range(c.num_layers + c.num_single_layers)]
    del ehs
    return out


def _in_flux2(m, c, B, r, grid, L, t):
    _, h, w = grid
    out = dict(
        hidden_states=r(B, h * w, c.in_channels),
        encoder_hidden_states=r(B, L, c.joint_attention_dim),
        timestep=_ts(B, t / 1000.0),
        img_ids=_ids_4d(1, h, w).unsqueeze(0).expand(B, -1, -1),
        txt_ids=torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(L))
        .float()
        .unsqueeze(0)
        .expand(B, -1, -1),
    )
    if c.guidance_embeds:
        out["guidance"] = torch.full((B,), 4.0)
    return out


_FLUX2 = dict(
    patch_size=1,
    in_channels=16,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=TEXT_DIM,
    timestep_guidance_channels=32,
    axes_dims_rope=(4, 4, 4, 4),
)


def _in_flux3(m, c, B, r, grid, L, t):
    _, h, w = grid
    return dict(  # no pipeline in diffusers 0.42.1; ids are (S, 4), not batched as in Flux 2
        hidden_states=r(B, h * w, c.in_channels),
        encoder_hidden_states=r(B, L, c.joint_attention_dim),
        timestep=_ts(B, t / 1000.0),
        img_ids=_ids_4d(1, h, w),
        txt_ids=torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(L)).float(),
    )


def _in_longcat_image(m, c, B, r, grid, L, t):
    out = _in_flux_like(m, c, B, r, grid, L, t)
    out["guidance"] = torch.full((B,), 3.5)
    return out


# ---- Qwen-Image (joint text-first; packed latents; grid from img_shapes) ----


def _in_qwen(m, c, B, r, grid, L, t, *, edit=False):
    _, h, w = grid
    hs = r(B, h * w, c.in_channels)
    shapes = [(1, h, w)]
    if edit:  # QwenImageEditPipeline: [target, reference image] latents, img_shapes lists both
        hs = torch.cat([hs, r(B, h * w, c.in_channels)], dim=1)
        shapes = [(1, h, w), (1, h, w)]
    return dict(
        hidden_states=hs,
        encoder_hidden_states=r(B, L, c.joint_attention_dim),
        encoder_hidden_states_mask=_mask(B, L),
        timestep=_ts(B, t / 1000.0),
        img_shapes=[shapes] * B,
    )


def _in_qwen21(m, c, B, r, grid, L, t):
    _, h, w = grid  # h, w even: each VLM image slot stands for 2x2 latent tokens
    return dict(
        hidden_states=r(B, h * w, c.in_channels),
        encoder_hidden_states=r(B, L, c.context_in_dim),
        timestep=_ts(B, t / 1000.0),
        img_shapes=[[(1, h, w)]] * B,
        # the joint sequence: L text slots, then one slot per 2x2 group of target latents (True)
        img_mask=torch.cat([torch.zeros(B, L, dtype=torch.bool), torch.ones(B, h * w // 4, dtype=torch.bool)], 1),
        encoder_hidden_states_mask=_mask(B, L).bool(),
    )


def _in_nucleus(m, c, B, r, grid, L, t):
    _, h, w = grid
    return dict(
        hidden_states=r(B, h * w, c.in_channels),
        encoder_hidden_states=r(B, L, c.joint_attention_dim),
        encoder_hidden_states_mask=_mask(B, L),
        timestep=_ts(B, t / 1000.0),
        img_shapes=[(1, h, w)] * B,
    )


# ---- HunyuanVideo 1.5 / framepack / HunyuanImage (joint, text last) ----


def _in_hv15(m, c, B, r, grid, L, t):
    return dict(
        hidden_states=_b_c_f_h_w(c, B, r, grid, p=c.patch_size),
        timestep=_ts(B, t),
        encoder_hidden_states=r(B, L, c.text_embed_dim),
        encoder_attention_mask=_mask(B, L),
        encoder_hidden_states_2=r(B, 4, c.text_embed_2_dim),
        encoder_attention_mask_2=torch.ones(B, 4, dtype=torch.long),
        image_embeds=torch.zeros(B, 3, c.image_embed_dim),  # t2v: zeros, as HunyuanVideo15Pipeline
    )


def _in_framepack(m, c, B, r, grid, L, t):
    f, h, w = grid
    p = c.patch_size
    C = c.in_channels
    return dict(
        hidden_states=r(B, C, f, h * p, w * p),
        timestep=_ts(B, t),
        encoder_hidden_states=r(B, L, c.text_embed_dim),
        encoder_attention_mask=_mask(B, L),
        pooled_projections=r(B, c.pooled_projection_dim),
        guidance=torch.full((B,), 10.0 * 1000.0),
        image_embeds=r(B, 5, c.image_proj_dim),
        indices_latents=torch.arange(f),
        latents_clean=r(B, C, 1, h * p, w * p),
        indices_latents_clean=torch.tensor([f]),
        latents_history_2x=r(B, C, 1, h * p, w * p),
        indices_latents_history_2x=torch.tensor([f + 1]),
        latents_history_4x=r(B, C, 4, h * p, w * p),
        indices_latents_history_4x=torch.arange(f + 2, f + 6),
    )


def _in_hunyuanimage(m, c, B, r, grid, L, t):
    _, h, w = grid
    ph, pw = c.patch_size
    return dict(
        hidden_states=r(B, c.in_channels, h * ph, w * pw),
        timestep=_ts(B, t),
        encoder_hidden_states=r(B, L, c.text_embed_dim),
        encoder_attention_mask=_mask(B, L),
    )


# ---- LTX-2 (video + audio; cross-attention to text, audio<->video cross-attention) ----


def _in_ltx2(m, c, B, r, grid, L, t):
    f, h, w = grid
    A = 9  # audio latent frames
    return dict(
        hidden_states=r(B, f * h * w, c.in_channels),
        audio_hidden_states=r(B, A, c.audio_in_channels),
        encoder_hidden_states=r(B, L, c.caption_channels),
        audio_encoder_hidden_states=r(B, L, c.caption_channels),
        timestep=_ts(B, t),
        encoder_attention_mask=_mask(B, L),
        audio_encoder_attention_mask=_mask(B, L),
        num_frames=f,
        height=h,
        width=w,
        fps=25.0,
        audio_num_frames=A,
    )


# ---- SD3 / AuraFlow / CogView (joint; (B, C, H, W) latents) ----


def _b_c_h_w(c, B, r, grid):
    """(B, C, H, W) latents for a (1, h, w) token grid and the config's patch size."""
    _, h, w = grid
    p = c.patch_size
    return r(B, c.in_channels, h * p, w * p)


def _in_sd3(m, c, B, r, grid, L, t):
    return dict(
        hidden_states=_b_c_h_w(c, B, r, grid),
        encoder_hidden_states=r(B, L, c.joint_attention_dim),
        pooled_projections=r(B, c.pooled_projection_dim),
        timestep=_ts(B, t),
    )


def _in_auraflow(m, c, B, r, grid, L, t):
    return dict(
        hidden_states=_b_c_h_w(c, B, r, grid),
        encoder_hidden_states=r(B, L, c.joint_attention_dim),
        timestep=_ts(B, t / 1000.0),
    )


def _in_cogview(m, c, B, r, grid, L, t):
    _, h, w = grid
    p = c.patch_size
    size = torch.tensor([[8 * p * h, 8 * p * w]], dtype=torch.float32).repeat(B, 1)
    return dict(
        hidden_states=r(B, c.in_channels, h * p, w * p),
        encoder_hidden_states=r(B, L, c.text_embed_dim),
        timestep=_ts(B, t).long(),
        original_size=size,
        target_size=size,
        crop_coords=torch.zeros(B, 2),
    )


def _in_glm_image(m, c, B, r, grid, L, t):
    _, h, w = grid
    p = c.patch_size
    return dict(
        hidden_states=r(B, c.in_channels, h * p, w * p),
        encoder_hidden_states=r(B, L, c.text_embed_dim),
        prior_token_id=torch.zeros(B, h * w, dtype=torch.long),
        prior_token_drop=torch.zeros(B, dtype=torch.bool),
        timestep=_ts(B, t).long(),
        target_size=torch.tensor([[8 * p * h, 8 * p * w]], dtype=torch.float32).repeat(B, 1),
        crop_coords=torch.zeros(B, 2),
    )


# ---- CogVideoX relatives ----


def _in_consisid(m, c, B, r, grid, L, t):
    f, h, w = grid
    p = c.patch_size
    return dict(
        hidden_states=r(B, f, c.in_channels, h * p, w * p),
        encoder_hidden_states=r(B, L, c.text_embed_dim),
        timestep=_ts(B, t).long(),
        id_vit_hidden=[torch.ones(B, 2, c.LFE_vit_dim)] * c.LFE_num_scale,  # face ViT features
        id_cond=torch.ones(B, c.LFE_id_dim),
    )


def _in_easyanimate(m, c, B, r, grid, L, t):
    f, h, w = grid
    p = c.patch_size
    return dict(
        hidden_states=r(B, c.in_channels, f, h * p, w * p),
        timestep=_ts(B, t).long(),
        encoder_hidden_states=r(B, L, c.text_embed_dim),
    )


# ---- other video models ----


def _in_cosmos(m, c, B, r, grid, L, t):
    f, h, w = grid
    return dict(
        hidden_states=_b_c_f_h_w(c, B, r, grid, chans=c.in_channels),
        timestep=_ts(B, t / 1000.0),  # Cosmos 2 text-to-image passes sigma / (sigma + 1), in 0..1
        encoder_hidden_states=r(B, L, c.text_embed_dim),
        fps=24,
    )


def _in_mochi(m, c, B, r, grid, L, t):
    return dict(
        hidden_states=_b_c_f_h_w(c, B, r, grid, p=c.patch_size),
        encoder_hidden_states=r(B, L, c.text_embed_dim),
        timestep=_ts(B, 1000.0 - t),  # MochiPipeline passes 1000 - t
        encoder_attention_mask=_mask(B, L).bool(),
    )


def _in_allegro(m, c, B, r, grid, L, t):
    return dict(
        hidden_states=_b_c_f_h_w(c, B, r, grid, p=c.patch_size),
        encoder_hidden_states=r(B, L, c.caption_channels),
        timestep=_ts(B, t).long(),
        encoder_attention_mask=_mask(B, L),
    )


def _in_latte(m, c, B, r, grid, L, t):
    return dict(
        hidden_states=_b_c_f_h_w(c, B, r, grid, p=c.patch_size),
        encoder_hidden_states=r(B, L, c.caption_channels),
        timestep=_ts(B, t).long(),
        enable_temporal_attentions=True,
    )


def _in_kandinsky5(m, c, B, r, grid, L, t):
    f, h, w = grid
    pt, ph, pw = c.patch_size
    return dict(
        hidden_states=r(B, f * pt, h * ph, w * pw, c.in_visual_dim),  # (B, F, H, W, C)
        encoder_hidden_states=r(B, L, c.in_text_dim),
        timestep=_ts(B, t),
        pooled_projections=r(B, c.in_text_dim2),
        visual_rope_pos=[torch.arange(f), torch.arange(h), torch.arange(w)],
        text_rope_pos=torch.arange(L),
    )


def _in_kandinsky6(m, c, B, r, grid, L, t):
    f, h, w = grid
    pt, ph, pw = c.patch_size
    return dict(
        hidden_states=r(B, f * pt, h * ph, w * pw, c.in_visual_dim),
        encoder_hidden_states=r(B, L, c.in_text_dim),
        pooled_projections=r(B, c.in_text_dim2),
        timestep=_ts(B, t),
        encoder_attention_mask=_mask(B, L).bool(),
    )


def _in_motif(m, c, B, r, grid, L, t):
    return dict(
        hidden_states=_b_c_f_h_w(c, B, r, grid, p=c.patch_size),
        encoder_hidden_states=r(B, L, c.text_embed_dim),
        encoder_attention_mask=_mask(B, L),
        timestep=_ts(B, t).long(),
    )


def _in_anyflow(m, c, B, r, grid, L, t):
    f, h, w = grid
    return dict(
        hidden_states=r(B, f, c.in_channels, 2 * h, 2 * w),  # (B, F, C, H, W)
        timestep=torch.full((B, f), float(t)),
        r_timestep=torch.full((B, f), float(t) / 2),
        encoder_hidden_states=r(B, L, c.text_dim),
    )


def _in_joyimage(m, c, B, r, grid, L, t):
    f, h, w = grid
    return dict(
        hidden_states=r(B, c.in_channels, f, 2 * h, 2 * w),
        timestep=_ts(B, t),
        encoder_hidden_states=r(B, L, c.text_dim),
    )


# ---- single-stream image models with their own input conventions ----


def _in_zimage(m, c, B, r, grid, L, t):
    _, h, w = grid
    p = c.all_patch_size[0]
    return dict(
        x=[r(c.in_channels, 1, h * p, w * p) for _ in range(B)],
        t=_ts(B, (1000.0 - t) / 1000.0),  # ZImagePipeline: (1000 - t) / 1000
        cap_feats=[r(L, c.cap_feat_dim) for _ in range(B)],
    )


def _in_lumina2(m, c, B, r, grid, L, t):
    return dict(
        hidden_states=_b_c_h_w(c, B, r, grid),
        timestep=_ts(B, 1.0 - t / 1000.0),  # Lumina2Pipeline: 1 - t / 1000
        encoder_hidden_states=r(B, L, c.cap_feat_dim),
        encoder_attention_mask=_mask(B, L).bool(),
    )


def _in_lumina_next(m, c, B, r, grid, L, t):
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    _, h, w = grid
    p = c.patch_size
    head_dim = c.hidden_size // c.num_attention_heads
    rope = get_2d_rotary_pos_embed_lumina(head_dim, 384, 384, linear_factor=1.0, ntk_factor=1.0)
    return dict(
        hidden_states=r(B, c.in_channels, h * p, w * p),
        timestep=_ts(B, 1.0 - t / 1000.0),
        encoder_hidden_states=r(B, L, c.cross_attention_dim),
        encoder_mask=_mask(B, L),
        image_rotary_emb=rope,
        cross_attention_kwargs={},  # the blocks splat it: None fails
    )


def _in_hidream(m, c, B, r, grid, L, t):
    _, h, w = grid
    p = c.patch_size
    n_llama = len(c.llama_layers)
    return dict(
        hidden_states=r(B, c.in_channels, h * p, w * p),
        timesteps=_ts(B, t).long(),
        encoder_hidden_states_t5=r(B, L, c.caption_channels[0]),
        encoder_hidden_states_llama3=r(n_llama, B, L, c.caption_channels[1]),
        pooled_embeds=r(B, c.text_emb_dim),
    )


def _in_sana(m, c, B, r, grid, L, t):  # Sana (B, C, H, W) and Sana-Video (B, C, F, H, W)
    video = isinstance(c.patch_size, (tuple, list))
    return dict(
        hidden_states=_b_c_f_h_w(c, B, r, grid) if video else _b_c_h_w(c, B, r, grid),
        encoder_hidden_states=r(B, L, c.caption_channels),
        timestep=_ts(B, t),
        encoder_attention_mask=_mask(B, L),
    )


def _in_pixart_like(m, c, B, r, grid, L, t):
    return dict(
        hidden_states=_b_c_h_w(c, B, r, grid),
        timestep=_ts(B, t).long(),
        class_labels=torch.zeros(B, dtype=torch.long),
    )


def _in_omnigen(m, c, B, r, grid, L, t):
    _, h, w = grid
    p = c.patch_size
    n = L + 1 + h * w  # text, the time token, the image
    return dict(
        hidden_states=r(B, c.in_channels, h * p, w * p),
        timestep=_ts(B, 1.0 - t / 1000.0),  # OmniGenPipeline's flow time
        input_ids=torch.randint(1, 10, (B, L), generator=torch.Generator().manual_seed(0)),
        input_img_latents=[],
        input_image_sizes={},
        attention_mask=torch.ones(B, n, n),
        position_ids=torch.arange(n).repeat(B, 1),
    )


def _in_prx(m, c, B, r, grid, L, t):
    return dict(
        hidden_states=_b_c_h_w(c, B, r, grid),
        timestep=_ts(B, t / 1000.0),
        encoder_hidden_states=r(B, L, c.context_in_dim),
        attention_mask=_mask(B, L).bool(),
    )


def _in_ernie(m, c, B, r, grid, L, t):
    return dict(
        hidden_states=_b_c_h_w(c, B, r, grid),
        timestep=_ts(B, t),
        text_bth=r(B, L, c.text_in_dim),
        text_lens=torch.tensor([L] + [L - 3] * (B - 1)),
    )


def _in_krea2(m, c, B, r, grid, L, t):
    _, h, w = grid
    pos = torch.zeros(L + h * w, 3)
    pos[L:, 1] = torch.arange(h).repeat_interleave(w).float()
    pos[L:, 2] = torch.arange(w).repeat(h).float()
    return dict(
        hidden_states=r(B, h * w, c.in_channels),
        encoder_hidden_states=r(B, L, c.num_text_layers, c.text_hidden_dim),
        timestep=_ts(B, t / 1000.0),
        position_ids=pos,
        encoder_attention_mask=_mask(B, L).bool(),
    )


def _in_ovis(m, c, B, r, grid, L, t):
    return _in_flux_like(m, c, B, r, grid, L, t)


def _in_ideogram4(m, c, B, r, grid, L, t):
    from diffusers.models.transformers.transformer_ideogram4 import (
        IMAGE_POSITION_OFFSET,
        LLM_TOKEN_INDICATOR,
        OUTPUT_IMAGE_INDICATOR,
    )

    _, h, w = grid
    n = L + h * w
    hs = torch.zeros(B, n, c.in_channels)
    hs[:, L:] = r(B, h * w, c.in_channels)
    ehs = torch.zeros(B, n, c.llm_features_dim)
    ehs[:, :L] = r(B, L, c.llm_features_dim)
    pos = torch.zeros(B, n, 3, dtype=torch.long)
    pos[:, :L] = torch.arange(L)[:, None]
    off = IMAGE_POSITION_OFFSET
    pos[:, L:, 0] = off
    pos[:, L:, 1] = torch.arange(h).repeat_interleave(w) + off
    pos[:, L:, 2] = torch.arange(w).repeat(h) + off
    ind = torch.full((B, n), LLM_TOKEN_INDICATOR, dtype=torch.long)
    ind[:, L:] = OUTPUT_IMAGE_INDICATOR
    return dict(
        hidden_states=hs,
        encoder_hidden_states=ehs,
        timestep=_ts(B, t / 1000.0),
        position_ids=pos,
        segment_ids=torch.ones(B, n, dtype=torch.long),
        indicator=ind,
    )


_ROW_LIST: list[TinyRow] = [
    # Wan 2.1 / 2.2 and relatives: attn1 = self-attention over video, attn2 = cross to text
    TinyRow("wan2.2-ti2v", "WanTransformer3DModel", dict(_WAN, in_channels=48, out_channels=48), _in_wan_ti2v,
            "cross", _VG, TEXT_LEN, r"blocks\.\d+\.attn1", r"blocks\.\d+\.attn2", timestep="per-token 0..1000",
            note="Wan 2.2 TI2V-5B: z_dim 48, timestep (B, F*H*W), first frame's tokens 0 for I2V"),
    TinyRow("wan-i2v", "WanTransformer3DModel", dict(_WAN, in_channels=36, image_dim=16, added_kv_proj_dim=48),
            _in_wan_i2v, "cross", _VG, 512, r"blocks\.\d+\.attn1", r"blocks\.\d+\.attn2",
            note="Wan 2.1 I2V: CLIP image tokens are prepended to the text in attn2 (two attention calls)"),
    TinyRow("wan-vace", "WanVACETransformer3DModel", dict(_WAN, vace_layers=[0, 1], vace_in_channels=48),
            _in_wan_vace, "cross", _VG, TEXT_LEN, r"(vace_)?blocks\.\d+\.attn1", r"(vace_)?blocks\.\d+\.attn2"),
    TinyRow("wan-animate", "WanAnimateTransformer3DModel",
            dict(_WAN, in_channels=36, latent_channels=16, image_dim=16, num_layers=2,
                 motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16}, motion_encoder_size=16,
                 motion_style_dim=8, motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16,
                 face_encoder_num_heads=2, inject_face_latents_blocks=2),
            _in_wan_animate, "cross", (5, 6, 8), TEXT_LEN, r"blocks\.\d+\.attn1", r"blocks\.\d+\.attn2",
            note="face adapter cross-attention (face_adapter.*) runs per frame"),
    TinyRow("chronoedit", "ChronoEditTransformer3DModel", dict(_WAN, image_dim=None, rope_temporal_skip_len=8),
            _in_wan_plain, "cross", _VG, TEXT_LEN, r"blocks\.\d+\.attn1", r"blocks\.\d+\.attn2"),
    TinyRow("skyreels-v2", "SkyReelsV2Transformer3DModel", dict(_WAN), _in_wan_plain, "cross", _VG, TEXT_LEN,
            r"blocks\.\d+\.attn1", r"blocks\.\d+\.attn2"),
    TinyRow("skyreels-v2-df", "SkyReelsV2Transformer3DModel", dict(_WAN, num_frame_per_block=1), _in_skyreels_df,
            "cross", _VG, TEXT_LEN, r"blocks\.\d+\.attn1", r"blocks\.\d+\.attn2", timestep="per-frame 0..1000",
            note="diffusion forcing: timestep (B, F); num_frame_per_block > 1 adds a block-causal frame mask"),
    TinyRow("helios", "HeliosTransformer3DModel",
            dict({k: v for k, v in _WAN.items() if k != "rope_max_seq_len"}, rope_dim=(8, 8, 8), guidance_cross_attn=True, has_multi_term_memory_patch=True,
                 zero_history_timestep=True, is_amplify_history=False),
            _in_helios, "cross", _SMALL_VG, TEXT_LEN, r"blocks\.\d+\.attn1", r"blocks\.\d+\.attn2",
            extra_tokens=64, extra_at="before-grid", note="history latents (short/mid/long) are prepended in attn1"),
    # Flux 1 and its relatives: joint [text, image]
    TinyRow("flux-kontext", "FluxTransformer2DModel", dict(_FLUX_LIKE, pooled_projection_dim=16, guidance_embeds=True),
            _in_flux_kontext, "joint-text-first", _IG, TEXT_LEN, r"(single_)?transformer_blocks\.\d+\.attn",
            extra_tokens=320, timestep="0..1", note="reference latents appended after the target image"),
    TinyRow("chroma", "ChromaTransformer2DModel",
            dict(_FLUX_LIKE, approximator_num_channels=8, approximator_hidden_dim=16, approximator_layers=1),
            _in_chroma, "joint-text-first", _IG, TEXT_LEN, r"(single_)?transformer_blocks\.\d+\.attn",
            timestep="0..1"),
    TinyRow("bria", "BriaTransformer2DModel", dict(_FLUX_LIKE, axes_dims_rope=(0, 8, 8)), _in_bria,
            "joint-text-first", _IG, TEXT_LEN, r"(single_)?transformer_blocks\.\d+\.attn"),
    TinyRow("bria-fibo", "BriaFiboTransformer2DModel",
            dict(_FLUX_LIKE, axes_dims_rope=(0, 8, 8), text_encoder_dim=16, joint_attention_dim=TEXT_DIM),
            _in_bria_fibo, "joint-text-first", _IG, TEXT_LEN, r"(single_)?transformer_blocks\.\d+\.attn"),
    TinyRow("longcat-image", "LongCatImageTransformer2DModel", dict(_FLUX_LIKE, pooled_projection_dim=16),
            _in_longcat_image, "joint-text-first", _IG, TEXT_LEN, r"(single_)?transformer_blocks\.\d+\.attn",
            timestep="0..1"),
    TinyRow("ovis-image", "OvisImageTransformer2DModel", dict(_FLUX_LIKE, out_channels=16), _in_ovis,
            "joint-text-first", _IG, TEXT_LEN, r"(single_)?transformer_blocks\.\d+\.attn", timestep="0..1"),
    TinyRow("flux2", "Flux2Transformer2DModel",
            dict(_FLUX2, guidance_embeds=True),
            _in_flux2, "joint-text-first", _IG, TEXT_LEN, r"(single_)?transformer_blocks\.\d+\.attn",
            timestep="0..1"),
    TinyRow("flux2-klein", "Flux2Transformer2DModel",
            dict(_FLUX2, guidance_embeds=False),
            _in_flux2, "joint-text-first", _IG, TEXT_LEN, r"(single_)?transformer_blocks\.\d+\.attn",
            timestep="0..1"),
    TinyRow("flux3", "Flux3Transformer2DModel",
            dict(in_channels=16, cond_in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=TEXT_DIM, timestep_channels=32,
                 axes_dims_rope=(4, 4, 4, 4)),
            _in_flux3, "joint-text-first", _IG, TEXT_LEN, r"(single_)?transformer_blocks\.\d+\.attn",
            timestep="0..1"),
    # Qwen-Image: joint [text, image]
    TinyRow("qwen-image", "QwenImageTransformer2DModel",
            dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=TEXT_DIM, axes_dims_rope=(4, 6, 6)),
            _in_qwen, "joint-text-first", _IG, TEXT_LEN, r"transformer_blocks\.\d+\.attn", timestep="0..1"),
    TinyRow("qwen-image-edit", "QwenImageTransformer2DModel",
            dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=TEXT_DIM, axes_dims_rope=(4, 6, 6)),
            lambda *a: _in_qwen(*a, edit=True), "joint-text-first", _IG, TEXT_LEN, r"transformer_blocks\.\d+\.attn",
            extra_tokens=320, timestep="0..1", note="reference-image latents appended after the target"),
    TinyRow("qwen-image21", "QwenImage21Transformer2DModel",
            dict(patch_size=1, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
                 num_attention_heads=2, context_in_dim=TEXT_DIM, axes_dims_rope=(4, 6, 6)),
            _in_qwen21, "joint-kv-text-first", _IG, TEXT_LEN, r"transformer_blocks\.\d+\.attn", timestep="0..1",
            note="two calls per processor call: causal text-only attention, then image queries over "
                 "[text, image] keys"),
    TinyRow("nucleusmoe-image", "NucleusMoEImageTransformer2DModel",
            dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=TEXT_DIM, axes_dims_rope=(4, 6, 6), moe_enabled=False),
            _in_nucleus, "joint-kv-text-last", _IG, TEXT_LEN, r"transformer_blocks\.\d+\.attn", timestep="0..1"),
    # Hunyuan family: joint [video, text] (text last)
    TinyRow("hunyuanvideo15", "HunyuanVideo15Transformer3DModel",
            dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                 num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=TEXT_DIM,
                 text_embed_2_dim=16, image_embed_dim=16, rope_axes_dim=(4, 6, 6), target_size=16, task_type="t2v"),
            _in_hv15, "joint-text-last", _VG, TEXT_LEN, r"transformer_blocks\.\d+\.attn", extra_tokens=7,
            text_span=(292, 305),
            note="per sample [video, valid image, valid byT5, valid text, padding]: 4 byT5 tokens before "
                 "the text, the 3 (t2v: all-zero, masked) image tokens moved to the end"),
    TinyRow("hunyuanvideo-framepack", "HunyuanVideoFramepackTransformer3DModel",
            dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
                 num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
                 text_embed_dim=TEXT_DIM, pooled_projection_dim=16, rope_axes_dim=(4, 6, 6),
                 has_image_proj=True, image_proj_dim=16, has_clean_x_embedder=True),
            _in_framepack, "joint-text-last", (3, 6, 8), TEXT_LEN, r"(single_)?transformer_blocks\.\d+\.attn",
            extra_tokens=69, extra_at="before-grid",
            note="clean / 2x / 4x history latents join the video tokens before the text"),
    TinyRow("hunyuanimage2.1", "HunyuanImageTransformer2DModel",
            dict(in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=1,
                 num_single_layers=1, num_refiner_layers=1, patch_size=(1, 1), text_embed_dim=TEXT_DIM,
                 rope_axes_dim=(8, 8)),
            _in_hunyuanimage, "joint-text-last", _IG, TEXT_LEN, r"(single_)?transformer_blocks\.\d+\.attn"),
    # LTX-2: video self-attention; text and audio by cross-attention
    TinyRow("ltx2", "LTX2VideoTransformer3DModel",
            dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
                 attention_head_dim=16, cross_attention_dim=32, audio_in_channels=8, audio_out_channels=8,
                 audio_num_attention_heads=2, audio_attention_head_dim=8, audio_cross_attention_dim=16,
                 num_layers=2, caption_channels=TEXT_DIM, rope_double_precision=False),
            _in_ltx2, "cross", _VG, TEXT_LEN, r"transformer_blocks\.\d+\.attn1",
            r"transformer_blocks\.\d+\.(attn2|audio_attn2|audio_to_video_attn|video_to_audio_attn)",
            note="audio self-attention (audio_attn1) covers audio tokens only"),
    # SD3 / SD3.5, AuraFlow: joint [image, text] (text after the image)
    TinyRow("sd3", "SD3Transformer2DModel",
            dict(sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                 num_attention_heads=2, caption_projection_dim=32, joint_attention_dim=TEXT_DIM,
                 pooled_projection_dim=16, out_channels=4, pos_embed_max_size=48),
            _in_sd3, "joint-text-last", _IG, TEXT_LEN, r"transformer_blocks\.\d+\.attn"),
    TinyRow("sd3.5", "SD3Transformer2DModel",
            dict(sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                 num_attention_heads=2, caption_projection_dim=32, joint_attention_dim=TEXT_DIM,
                 pooled_projection_dim=16, out_channels=4, pos_embed_max_size=48, dual_attention_layers=(0,),
                 qk_norm="rms_norm"),
            _in_sd3, "joint-text-last", _IG, TEXT_LEN, r"transformer_blocks\.\d+\.attn2?",
            note="SD3.5-medium: attn2 of the dual-attention blocks is image-only self-attention"),
    TinyRow("auraflow", "AuraFlowTransformer2DModel",
            dict(sample_size=32, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
                 attention_head_dim=16, num_attention_heads=2, caption_projection_dim=32,
                 joint_attention_dim=TEXT_DIM, out_channels=4, pos_embed_max_size=1024),
            _in_auraflow, "joint-text-first", _IG, TEXT_LEN, r"(joint_|single_)transformer_blocks\.\d+\.attn",
            extra_tokens=8, extra_at="text-first", timestep="0..1", note="8 register tokens before the text"),
    TinyRow("cogview3plus", "CogView3PlusTransformer2DModel",
            dict(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                 out_channels=4, text_embed_dim=TEXT_DIM, time_embed_dim=16, condition_dim=4,
                 pos_embed_max_size=32, sample_size=32),
            _in_cogview, "joint-text-first", _IG, TEXT_LEN, r"transformer_blocks\.\d+\.attn1"),
    TinyRow("cogview4", "CogView4Transformer2DModel",
            dict(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                 out_channels=4, text_embed_dim=TEXT_DIM, time_embed_dim=16, condition_dim=4,
                 rope_axes_dim=(256, 256)),
            _in_cogview, "joint-text-first", _IG, TEXT_LEN, r"transformer_blocks\.\d+\.attn1"),
    TinyRow("glm-image", "GlmImageTransformer2DModel",
            dict(patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
                 num_attention_heads=2, text_embed_dim=TEXT_DIM, time_embed_dim=16, condition_dim=8,
                 prior_vq_quantizer_codebook_size=64),
            _in_glm_image, "joint-text-first", _IG, TEXT_LEN, r"transformer_blocks\.\d+\.attn1"),
    TinyRow("consisid", "ConsisIDTransformer3DModel",
            dict(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4, time_embed_dim=32,
                 text_embed_dim=TEXT_DIM, num_layers=2, sample_width=24, sample_height=16, sample_frames=9,
                 patch_size=2, temporal_compression_ratio=4, max_text_seq_length=TEXT_LEN,
                 use_rotary_positional_embeddings=False, cross_attn_interval=1, is_kps=False, is_train_face=True,
                 cross_attn_dim_head=8, cross_attn_num_heads=2, LFE_id_dim=2, LFE_vit_dim=2, LFE_depth=5,
                 LFE_dim_head=8, LFE_num_heads=2, LFE_num_id_token=1, LFE_num_querie=1, LFE_output_dim=42,  # = 2/3 of the inner dim (64)
                
                 LFE_ff_mult=1, LFE_num_scale=1),
            _in_consisid, "joint-text-first", _VG, TEXT_LEN, r"transformer_blocks\.\d+\.attn1",
            r"perceiver_cross_attention\.\d+", note="face-ID perceiver cross-attention between blocks"),
    TinyRow("easyanimate", "EasyAnimateTransformer3DModel",
            dict(attention_head_dim=16, num_attention_heads=2, in_channels=4, mmdit_layers=2, num_layers=2,
                 out_channels=4, patch_size=2, sample_height=16, sample_width=24, text_embed_dim=TEXT_DIM,
                 time_embed_dim=16, time_position_encoding_type="3d_rope", timestep_activation_fn="silu"),
            _in_easyanimate, "joint-text-first", _VG, TEXT_LEN, r"transformer_blocks\.\d+\.attn1"),
    # other video models
    TinyRow("cosmos", "CosmosTransformer3DModel",
            dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=24, num_layers=2,
                 mlp_ratio=2, text_embed_dim=TEXT_DIM, adaln_lora_dim=4, max_size=(8, 32, 32),
                 patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0), concat_padding_mask=False,  # True needs torchvision
                 extra_pos_embed_type="learnable"),
            _in_cosmos, "cross", _VG, TEXT_LEN, r"transformer_blocks\.\d+\.attn1", r"transformer_blocks\.\d+\.attn2",
            timestep="0..1"),
    TinyRow("mochi", "MochiTransformer3DModel",
            dict(patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2, pooled_projection_dim=16,
                 in_channels=4, qk_norm="rms_norm", text_embed_dim=TEXT_DIM, time_embed_dim=16,
                 activation_fn="swiglu", max_sequence_length=TEXT_LEN),
            _in_mochi, "joint-text-last", _VG, TEXT_LEN, r"transformer_blocks\.\d+\.attn1", timestep="1000-t",
            text_modulates=True,
            note="MochiAttnProcessor2_0 runs attention per sample on its unpadded text (no mask)"),
    TinyRow("allegro", "AllegroTransformer3DModel",
            dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=2,
                 cross_attention_dim=32, sample_width=24, sample_height=16, sample_frames=3,
                 caption_channels=TEXT_DIM),
            _in_allegro, "cross", _VG, TEXT_LEN, r"transformer_blocks\.\d+\.attn1", r"transformer_blocks\.\d+\.attn2"),
    TinyRow("latte", "LatteTransformer3DModel",
            dict(sample_size=16, num_layers=1, patch_size=2, attention_head_dim=16, num_attention_heads=2,
                 caption_channels=TEXT_DIM, in_channels=4, cross_attention_dim=32, out_channels=8,
                 attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                 norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, video_length=3),
            _in_latte, "cross", _VG, TEXT_LEN, r"(transformer_blocks|temporal_transformer_blocks)\.\d+\.attn1",
            r"transformer_blocks\.\d+\.attn2", self_len=96,
            note="spatial attn1 per frame (H*W tokens, batch B*F); temporal attn1 per pixel (F tokens)"),
    TinyRow("sana-video", "SanaVideoTransformer3DModel",
            dict(in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=24, num_layers=2,
                 num_cross_attention_heads=2, cross_attention_head_dim=24, cross_attention_dim=48,
                 caption_channels=TEXT_DIM, mlp_ratio=2.5, sample_size=16, patch_size=(1, 2, 2),
                 rope_max_seq_len=64),
            _in_sana, "linear", _VG, TEXT_LEN, r"transformer_blocks\.\d+\.attn1",
            r"transformer_blocks\.\d+\.attn2", softmax=False, note="attn1 is linear attention (ReLU kernels)"),
    TinyRow("kandinsky5", "Kandinsky5Transformer3DModel",
            dict(in_visual_dim=4, in_text_dim=TEXT_DIM, in_text_dim2=16, time_dim=32, out_visual_dim=4,
                 patch_size=(1, 2, 2), model_dim=64, ff_dim=64, num_text_blocks=1, num_visual_blocks=2,
                 axes_dims=(8, 12, 12)),
            _in_kandinsky5, "cross", _VG, TEXT_LEN, r"visual_transformer_blocks\.\d+\.self_attention",
            r"visual_transformer_blocks\.\d+\.cross_attention", redraw_zero=r".*modulation\.out_layer\.weight"),
    TinyRow("kandinsky6", "Kandinsky6Transformer3DModel",
            dict(in_visual_dim=4, out_visual_dim=4, in_text_dim=TEXT_DIM, in_text_dim2=16, time_dim=32,
                 patch_size=(1, 2, 2), model_dim=64, ff_dim=64, num_text_blocks=1, num_visual_blocks=2,
                 axes_dims=(8, 12, 12), visual_cond=False),
            _in_kandinsky6, "cross", _VG, TEXT_LEN, r"visual_transformer_blocks\.\d+\.video_dec_block\.self_attention",
            r"visual_transformer_blocks\.\d+\.video_dec_block\.cross_attention"),
    TinyRow("motif-video", "MotifVideoTransformer3DModel",
            dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=1,
                 num_single_layers=1, num_decoder_layers=0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
                 text_embed_dim=TEXT_DIM, image_embed_dim=None, rope_axes_dim=(4, 4, 4)),
            _in_motif, "joint-text-last", _VG, TEXT_LEN, r"(single_)?transformer_blocks\.\d+\.attn"),
    TinyRow("anyflow", "AnyFlowTransformer3DModel",
            dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=4,
                 text_dim=TEXT_DIM, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
                 rope_max_seq_len=64),
            _in_anyflow, "cross", _VG, TEXT_LEN, r"blocks\.\d+\.attn1", r"blocks\.\d+\.attn2",
            timestep="per-frame 0..1000"),
    TinyRow("joyimage", "JoyImageEditTransformer3DModel",
            dict(patch_size=[1, 2, 2], in_channels=16, hidden_size=32, num_attention_heads=2, text_dim=TEXT_DIM,
                 num_layers=2, rope_dim_list=[4, 6, 6], theta=256),
            _in_joyimage, "joint-text-last", _IG, TEXT_LEN, r"double_blocks\.\d+\.attn", timestep="0..1000"),
    # single-stream image models with their own inputs
    TinyRow("z-image", "ZImageTransformer2DModel",
            dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
                 n_heads=2, n_kv_heads=2, qk_norm=True, cap_feat_dim=TEXT_DIM, rope_theta=256.0, t_scale=1000.0,
                 axes_dims=[4, 6, 6], axes_lens=[256, 64, 64]),
            _in_zimage, "joint-text-last", _IG, TEXT_LEN, r"layers\.\d+\.attention", text_span=(320, 352),
            self_len=352, timestep="(1000-t)/1000", text_arg="cap_feats",
            note="noise_refiner (image only) and context_refiner (text only) run before the joint layers; "
                 "sequences are padded to a multiple of 32"),
    TinyRow("lumina2", "Lumina2Transformer2DModel",
            dict(sample_size=32, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_refiner_layers=1,
                 num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 6, 6),
                 axes_lens=(300, 64, 64), cap_feat_dim=TEXT_DIM),
            _in_lumina2, "joint-text-first", _IG, TEXT_LEN, r"layers\.\d+\.attn", timestep="1-t/1000",
            note="noise_refiner (image) and context_refiner (text) before the joint layers"),
    TinyRow("lumina-next", "LuminaNextDiT2DModel",
            dict(sample_size=32, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_attention_heads=2,
                 num_kv_heads=1, multiple_of=16, learn_sigma=False, qk_norm=True, cross_attention_dim=TEXT_DIM),
            _in_lumina_next, "cross", _IG, TEXT_LEN, r"layers\.\d+\.attn1", r"layers\.\d+\.attn2",
            timestep="1-t/1000", text_modulates=True),
    TinyRow("hidream", "HiDreamImageTransformer2DModel",
            dict(patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                 num_attention_heads=2, caption_channels=[TEXT_DIM, 16], text_emb_dim=16, num_routed_experts=2,
                 num_activated_experts=2, axes_dims_rope=(8, 4, 4), max_resolution=(32, 40), llama_layers=(0, 1),
                 force_inference_output=True),
            _in_hidream, "joint-text-last", _IG, TEXT_LEN, r"(double|single)_stream_blocks\.\d+\.block\.attn1",
            text_arg="encoder_hidden_states_t5", extra_tokens=26, extra_at="after-text",
            note="image then [T5, llama layer i] text; single-stream blocks get the llama tokens of their layer"),
    TinyRow("sana", "SanaTransformer2DModel",
            dict(patch_size=1, in_channels=4, out_channels=4, num_layers=2, num_attention_heads=2,
                 attention_head_dim=16, num_cross_attention_heads=2, cross_attention_head_dim=16,
                 cross_attention_dim=32, caption_channels=TEXT_DIM, sample_size=32),
            _in_sana, "linear", (1, 16, 20), TEXT_LEN, r"transformer_blocks\.\d+\.attn1",
            r"transformer_blocks\.\d+\.attn2", softmax=False,
            note="attn1 is linear attention (SanaLinearAttnProcessor2_0); refuse"),
    TinyRow("dit", "DiTTransformer2DModel",
            dict(in_channels=4, out_channels=8, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                 norm_type="ada_norm_zero", num_embeds_ada_norm=1000, patch_size=2, sample_size=32),
            _in_pixart_like, "self", (1, 16, 16), None, r"transformer_blocks\.\d+\.attn1", text_arg=None,
            note="class-conditional, no text"),
    TinyRow("omnigen", "OmniGenTransformer2DModel",
            dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64, num_layers=2,
                 pad_token_id=0, vocab_size=100, in_channels=4, time_step_dim=16,
                 rope_scaling={"long_factor": list(range(1, 9)), "short_factor": list(range(1, 9))}),
            _in_omnigen, "joint-text-first", _IG, TEXT_LEN, r"layers\.\d+\.self_attn", extra_tokens=1,
            extra_at="after-text", timestep="1-t/1000", text_arg=None,
            note="LLM (Phi-3) layers over [text ids, time token, image]; full (B, S, S) mask"),
    TinyRow("prx", "PRXTransformer2DModel",
            dict(in_channels=4, patch_size=2, context_in_dim=TEXT_DIM, hidden_size=32, mlp_ratio=2.0, num_heads=2,
                 depth=2, axes_dim=[8, 8]),
            _in_prx, "joint-kv-text-first", _IG, TEXT_LEN, r"blocks\.\d+\.attention", timestep="0..1",
            redraw_zero=r"blocks\.\d+\.modulation\.lin\.weight",
            note="keys = [text, image], queries = image only"),
    TinyRow("ernie-image", "ErnieImageTransformer2DModel",
            dict(hidden_size=32, num_attention_heads=2, num_layers=2, ffn_hidden_size=64, in_channels=4,
                 out_channels=4, patch_size=1, text_in_dim=TEXT_DIM, rope_theta=256, rope_axes_dim=(4, 6, 6)),
            _in_ernie, "joint-text-last", (1, 16, 20), TEXT_LEN, r"layers\.\d+\.self_attention", text_arg="text_bth",
            redraw_zero=r"adaLN_modulation\.1\.weight|final_linear\.weight"),
    TinyRow("krea2", "Krea2Transformer2DModel",
            dict(in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=32, timestep_embed_dim=8, text_hidden_dim=16, num_text_layers=2,
                 text_num_attention_heads=2, text_num_key_value_heads=1, text_intermediate_size=16,
                 num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(4, 6, 6)),
            _in_krea2, "joint-text-first", _IG, TEXT_LEN, r"transformer_blocks\.\d+\.attn", timestep="0..1"),
    TinyRow("ideogram4", "Ideogram4Transformer2DModel",
            dict(in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2, intermediate_size=32,
                 adaln_dim=16, llm_features_dim=TEXT_DIM, mrope_section=(4, 2, 2)),
            _in_ideogram4, "joint-text-first", _IG, TEXT_LEN, r"layers\.\d+\.attention", timestep="0..1",
            note="text and image share one hidden_states tensor; the sequence is [text, image]"),
]

# processors that call F.scaled_dot_product_attention themselves (no dispatch_attention_fn)
_DIRECT_SDPA = {"sd3", "sd3.5", "auraflow", "cogview3plus", "cogview4", "consisid", "easyanimate", "mochi", "allegro",
                "latte", "lumina2", "lumina-next", "hidream", "dit", "omnigen"}
_ROWS: dict[str, TinyRow] = {
    row.key: dataclasses.replace(row, via="direct") if row.key in _DIRECT_SDPA else row for row in _ROW_LIST
}

# every key tiny_transformer / tiny_inputs / tiny_shape accept
ALL_FAMILIES = FAMILIES + tuple(_ROWS)


def _check_family(family: str, allowed=ALL_FAMILIES) -> None:
    if family not in allowed:
        raise ValueError(f"unknown family {family!r}; expected one of {allowed}")


def tiny_shape(family: str) -> TinyShape:
    """Token grid, text length and text layout of ``tiny_inputs(family, tiny_transformer(family))``."""
    _check_family(family)
    if family in _ROWS:
        row = _ROWS[family]
        return TinyShape(family, row.grid, row.text_len or 0, row.layout, row.extra_tokens, row.softmax)
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
    if family in _ROWS:
        return _row_transformer(family, seed, qk_gain, config_overrides)
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
    :func:`rettn.tools.profile.dummy_inputs.forward_inputs` at the tiny defaults (grid ``tiny_shape(family).grid``,
    ``TEXT_LEN`` text tokens, the last 3 text tokens of samples 1..B-1 padded where the forward
    takes a text mask)."""
    from rettn.tools.profile.dummy_inputs import forward_inputs

    _check_family(family)
    if family in _ROWS:
        return _row_inputs(family, model, batch, seed, grid, text_len, t)
    return forward_inputs(family, model, batch, seed, grid=grid if grid is not None else tiny_shape(family).grid,
                          text_len=text_len if text_len is not None else TEXT_LEN, t=t)


def _row_transformer(key: str, seed: int, qk_gain: float, overrides: dict) -> torch.nn.Module:
    import re

    import diffusers

    row = _ROWS[key]
    cls = getattr(diffusers, row.model_class)
    config = dict(row.config)
    config.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(**config)
        # LuminaNextDiT2DModel's pad_token is torch.empty (never initialised): draw it
        for name, p in model.named_parameters():
            redraw = name == "pad_token" or (row.redraw_zero is not None and re.fullmatch(row.redraw_zero, name))
            if redraw:
                with torch.no_grad():
                    p.normal_(0.0, 0.1)
    if qk_gain != 1.0:
        _scale_qk(model, qk_gain)
    return model.eval()


def _row_inputs(key, model, batch, seed, grid, text_len, t) -> dict[str, Any]:
    row = _ROWS[key]
    p = next(model.parameters())
    device, dtype = p.device, p.dtype
    gen = torch.Generator().manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, generator=gen)

    kwargs = row.build(model, model.config, batch, randn, grid or row.grid, text_len or row.text_len or 0, t)

    def move(x):  # floating tensors to the model dtype (timesteps included: tiny models are fp32)
        if isinstance(x, torch.Tensor):
            return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
        if isinstance(x, (tuple, list)):
            return type(x)(move(v) for v in x)
        if isinstance(x, dict):
            return {k: move(v) for k, v in x.items()}
        return x

    kwargs = {k: move(v) for k, v in kwargs.items()}
    kwargs["return_dict"] = False
    return kwargs


def tiny_row(key: str) -> TinyRow:
    """The data row of a key added after the original eight (see ``ALL_FAMILIES``)."""
    if key not in _ROWS:
        raise ValueError(f"{key!r} has no data row; expected one of {tuple(_ROWS)}")
    return _ROWS[key]


# --------------------------------------------------------------------------------------------
# Seeing the attention calls of a forward pass
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class AttnCall:
    """One core attention call seen during a forward pass (tensors as the kernel gets them).

    module: ``named_modules()`` name of the innermost module with a ``processor`` attribute
        running at the time (else the innermost module), module_class its class name.
    processor: class name of the processor object whose ``__call__`` is on the stack (None if
        none). call: index of that processor invocation in the trace (several attention calls in
        one processor call share it).
    kind: "sdpa" (torch's scaled_dot_product_attention), "softmax" (a manual softmax inside an
        attention module) or "flex" (flex_attention).
    via: "dispatch" when diffusers' ``dispatch_attention_fn`` is on the stack, else "direct".
    backend: the ``backend`` argument given to ``dispatch_attention_fn`` (None: the active one).
    q, k, v: shapes, (B, H, S, D) for SDPA. mask: shape of attn_mask (None if none).
    """

    module: str | None
    module_class: str | None
    processor: str | None
    call: int
    kind: str
    via: str
    backend: str | None
    q: tuple
    k: tuple
    v: tuple
    mask: tuple | None = None
    mask_dtype: str | None = None
    is_causal: bool = False
    enable_gqa: bool = False
    q_value: torch.Tensor | None = dataclasses.field(default=None, repr=False)
    k_value: torch.Tensor | None = dataclasses.field(default=None, repr=False)
    mask_value: torch.Tensor | None = dataclasses.field(default=None, repr=False)


@dataclasses.dataclass
class AttnTrace:
    """What :func:`trace_attention` saw: the model output, every attention call in order, and
    the attention modules (those with a ``processor``) that ran without making any call that
    the trace recognises (linear attention, a kernel outside torch)."""

    output: Any
    calls: list[AttnCall]
    silent: list[str]

    def of(self, pattern: str) -> list[AttnCall]:
        """The calls made inside modules whose name matches ``pattern`` (re.fullmatch)."""
        import re

        rx = re.compile(pattern)
        return [c for c in self.calls if c.module is not None and rx.fullmatch(c.module)]


def trace_attention(model: torch.nn.Module, kwargs: dict, *, keep_values: bool = False) -> AttnTrace:
    """Run ``model(**kwargs)`` under a TorchFunctionMode that records every attention call.

    Nothing is rebound: the mode sees the calls made by this forward on this thread only, and
    forward pre-hooks (removed before returning) note which attention modules ran.
    ``keep_values`` keeps a copy of each q (and mask) on its call.
    """
    import sys

    from torch.overrides import TorchFunctionMode

    import torch.nn.functional as F

    names = {id(m): n for n, m in model.named_modules()}
    calls: list[AttnCall] = []
    last_proc = [None, -1]  # frame of the last processor call seen, its index
    softmaxes = {torch.softmax, F.softmax, torch.Tensor.softmax, torch.nn.functional.softmax}
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:  # pragma: no cover
        flex_attention = None

    def where():
        frame = sys._getframe(2)
        module = inner = proc = proc_frame = None
        via, backend = "direct", None
        while frame is not None:
            code = frame.f_code
            loc = frame.f_locals
            if code.co_name == "dispatch_attention_fn" and via == "direct":
                via = "dispatch"
                b = loc.get("backend")
                backend = None if b is None else str(getattr(b, "value", b))
            slf = loc.get("self")
            if slf is not None:
                if proc is None and code.co_name == "__call__" and "Processor" in type(slf).__name__:
                    proc, proc_frame = type(slf).__name__, frame
                if isinstance(slf, torch.nn.Module) and id(slf) in names:
                    if inner is None:
                        inner = slf
                    if module is None and hasattr(slf, "processor"):
                        module = slf
            frame = frame.f_back
        module = module if module is not None else inner
        if proc_frame is not None and proc_frame is not last_proc[0]:
            last_proc[0], last_proc[1] = proc_frame, last_proc[1] + 1
        call = last_proc[1] if proc_frame is not None else -1
        name = names.get(id(module)) if module is not None else None
        return name, (type(module).__name__ if module is not None else None), proc, call, via, backend

    def shape(x):
        return tuple(x.shape) if isinstance(x, torch.Tensor) else None

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kw=None):
            kw = kw or {}
            if func is F.scaled_dot_product_attention:
                q, k, v = (list(args) + [None] * 3)[:3]
                q = kw.get("query", q)
                k = kw.get("key", k)
                v = kw.get("value", v)
                mask = kw.get("attn_mask", args[3] if len(args) > 3 else None)
                name, mcls, proc, call, via, backend = where()
                calls.append(AttnCall(
                    name, mcls, proc, call, "sdpa", via, backend, shape(q), shape(k), shape(v), shape(mask),
                    str(mask.dtype) if isinstance(mask, torch.Tensor) else None,
                    bool(kw.get("is_causal", args[5] if len(args) > 5 else False)), bool(kw.get("enable_gqa", False)),
                    q.detach().clone() if keep_values else None,
                    k.detach().clone() if keep_values else None,
                    mask.detach().clone() if keep_values and isinstance(mask, torch.Tensor) else None,
                ))
            elif func in softmaxes or (flex_attention is not None and func is flex_attention):
                name, mcls, proc, call, via, backend = where()
                if proc is not None or (mcls is not None and "Attention" in mcls):
                    x = args[0] if args else None
                    calls.append(AttnCall(name, mcls, proc, call, "softmax" if func in softmaxes else "flex", via,
                                          backend, shape(x), (), ()))
            return func(*args, **kw)

    ran: list[str] = []
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, n=n: ran.append(n))
        for n, m in model.named_modules()
        if hasattr(m, "processor")
    ]
    try:
        with torch.no_grad(), Mode():
            out = model(**kwargs)
    finally:
        for h in hooks:
            h.remove()
    seen = {c.module for c in calls}
    silent = list(dict.fromkeys(n for n in ran if n not in seen))
    return AttnTrace(out, calls, silent)


def perturb_text(family: str, kwargs: dict, seed: int = 1) -> dict:
    """A copy of ``kwargs`` with the family's text argument redrawn (same shapes; integer token
    ids are shifted). Comparing traces of the two tells which attention positions hold text."""
    name = tiny_row(family).text_arg if family in _ROWS else "encoder_hidden_states"
    if name is None:
        name = "input_ids" if "input_ids" in kwargs else None
    if name is None:
        raise ValueError(f"{family} takes no text")
    gen = torch.Generator().manual_seed(seed)

    def redraw(x):
        if isinstance(x, (list, tuple)):
            return type(x)(redraw(v) for v in x)
        if not x.is_floating_point():
            return (x % 7) + 1
        return torch.randn(x.shape, generator=gen).to(x)

    out = dict(kwargs)
    out[name] = redraw(kwargs[name])
    return out


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
    "wan2.2-a14b": dict(height=64, width=96, num_frames=9),
}


def tiny_pipeline_kwargs(family: str, seed: int = 0, num_inference_steps: int = 3, **overrides) -> dict:
    """Keyword arguments for ``tiny_pipeline(family)(**kwargs)``: 3 steps, CFG on, torch output.

    The text lengths are the pipelines' defaults (CogVideoX 226, PixArt-alpha 120, PixArt-sigma 300,
    Wan 512); pass ``max_sequence_length=...`` to change them (CogVideoX without RoPE needs 226).
    """
    _check_family(family, ALL_PIPELINE_FAMILIES)
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
    _check_family(family, ALL_PIPELINE_FAMILIES)
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
    elif family in ("wan", "wan2.2-a14b"):
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
        experts = {}
        if family == "wan2.2-a14b":
            # Wan 2.2 A14B: the high-noise expert (transformer) runs t >= boundary_ratio * 1000,
            # the low-noise expert (transformer_2) the rest; same architecture, other weights
            experts = dict(
                transformer_2=tiny_transformer("wan", seed + 1, qk_gain=qk_gain),
                boundary_ratio=WAN22_BOUNDARY_RATIO,
            )
        pipe = diffusers.WanPipeline(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            transformer=transformer,
            scheduler=scheduler,
            **experts,
        )
    else:  # pragma: no cover
        raise ValueError(family)

    pipe.set_progress_bar_config(disable=True)
    return pipe
