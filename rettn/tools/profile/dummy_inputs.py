"""Forward inputs for a diffusers transformer, as its pipeline would pass them, at any token grid.

No weights, text encoder or VAE are needed: latents and text embeddings are seeded random
tensors of the right shapes, and the positional inputs (RoPE tables, Flux position ids, LTX grid)
are computed the way each pipeline computes them. What this is for: timing a transformer at a
real model's shapes (``rettn profile --random-weights``) and the tests' tiny models.

    kwargs = forward_inputs("cogvideox", model, batch=2, grid=(13, 30, 45), text_len=226)
    out = model(**kwargs)
    kwargs["timestep"] = timestep_tensor("cogvideox", 250.0, 2, device, model.dtype)

Families are rows of rettn's family table (:mod:`rettn.diffusers.families`), which also gives
the facts these inputs follow (image or video, text in the self-attention sequence, the text-mask
argument, the timestep's scale and dtype); this module holds only how each family's pipeline
shapes its tensors: ``cogvideox`` (``cogvideox-rope`` is an alias; RoPE is read from the model's
config), ``pixart``, ``hunyuan-dit``, ``wan``, ``flux``, ``hunyuanvideo``, ``ltx-video``.

Every tensor is drawn on the CPU from one seeded generator and only then moved to the device
and dtype, so a seed gives the same inputs on any device.
"""

from __future__ import annotations

from typing import Any

import torch

from rettn.diffusers.families import FAMILIES as TABLE
from rettn.errors import InputError

FAMILIES = ("cogvideox", "pixart", "hunyuan-dit", "wan", "flux", "hunyuanvideo", "ltx-video")  # those built below
ALIASES = {"cogvideox-rope": "cogvideox"}
IMAGE_FAMILIES = tuple(f for f in FAMILIES if TABLE[f].image)
# Families whose forward takes a text mask: padded text is produced for them (text_padding).
MASKED_TEXT = tuple(f for f in FAMILIES if TABLE[f].text_mask_arg)


def canonical_family(family: str) -> str:
    family = ALIASES.get(family, family)
    if family not in FAMILIES:
        raise InputError(f"no dummy inputs for family {family!r}; expected one of {FAMILIES + tuple(ALIASES)}")
    return family


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, getattr(model, "dtype", p.dtype)


def text_mask(batch: int, text_len: int, padding: int = 3) -> torch.Tensor:
    """(B, L) long mask: sample 0 sees all text; every other sample has its last ``padding``
    tokens padded (when the text is longer than that)."""
    mask = torch.ones(batch, text_len, dtype=torch.long)
    if padding and text_len > padding:
        mask[1:, -padding:] = 0
    return mask


def timestep_tensor(family: str, t: float, batch: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The ``timestep`` argument for denoising time ``t`` on the 0..1000 scale, as the family's
    pipeline passes it (the family row's ``timestep_scale`` and ``timestep_dtype``): CogVideoX
    and PixArt an integer tensor, Flux ``t / 1000``; Flux, HunyuanVideo and Hunyuan-DiT in the
    model dtype, Wan and LTX in float32."""
    row = TABLE[canonical_family(family)]
    if row.timestep_dtype == "long":
        ts = torch.full((batch,), int(t * row.timestep_scale / 1000.0), dtype=torch.long)
    else:
        ts = torch.full((batch,), float(t) if row.timestep_scale == 1000.0 else t * row.timestep_scale / 1000.0)
    if row.timestep_dtype == "model":
        return ts.to(device=device, dtype=dtype)
    return ts.to(device)


def fixed_text_len(family: str, config) -> int | None:
    """The text length the model's config fixes, or None when any length works."""
    family = canonical_family(family)
    if family == "cogvideox" and not config.use_rotary_positional_embeddings:
        return int(config.max_text_seq_length)  # the sin-cos table holds that many text slots
    if family == "hunyuan-dit":
        return int(config.text_len) + int(config.text_len_t5)
    return None


def sequence_length(family: str, config, grid, text_len: int) -> int:
    """Tokens in the self-attention (joint families, whose row places text in it, add the text)."""
    family = canonical_family(family)
    f, h, w = grid
    n = f * h * w
    if TABLE[family].text is not None:
        n += fixed_text_len(family, config) or text_len
    return n


def forward_inputs(
    family: str,
    model: torch.nn.Module,
    batch: int = 2,
    seed: int = 0,
    *,
    grid: tuple[int, int, int],
    text_len: int | None = None,
    t: float = 500.0,
    text_padding: int = 3,
    device=None,
    dtype=None,
) -> dict[str, Any]:
    """Keyword arguments for ``model(**kwargs)``, as the family's pipeline would pass them.

    grid: (frames, height, width) in tokens after patchify (Flux: after 2 x 2 packing). Image
        families need frames == 1.
    text_len: text tokens; ignored where the model's config fixes it (CogVideoX without RoPE:
        ``max_text_seq_length``; Hunyuan-DiT: ``text_len + text_len_t5``). Required otherwise.
    t: the denoising time on the 0..1000 scale, the same for every sample (as pipelines do);
        converted to what the family's forward expects (:func:`timestep_tensor`).
    text_padding: for the families whose forward takes a text mask (PixArt, Hunyuan-DiT's CLIP
        part, HunyuanVideo, LTX-Video), samples 1..B-1 get their last ``text_padding`` text
        tokens masked out (0: no padding).
    device, dtype: default to the model's parameters'.
    """
    family = canonical_family(family)
    row = TABLE[family]
    f, h, w = (int(x) for x in grid)
    if min(f, h, w) < 1:
        raise InputError(f"grid must be three positive token counts (frames, height, width), got {grid}")
    if family in IMAGE_FAMILIES and f != 1:
        raise InputError(f"{family} is an image model: grid frames must be 1, got {f}")
    cfg = model.config
    L = fixed_text_len(family, cfg) or text_len
    if L is None:
        raise InputError(f"text_len is needed for {family}")
    m_device, m_dtype = _model_device_dtype(model)
    device = m_device if device is None else torch.device(device)
    dtype = m_dtype if dtype is None else dtype
    gen = torch.Generator().manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, generator=gen)

    def ts():
        return timestep_tensor(family, t, batch)  # cast with the others below

    out: dict[str, Any]
    if family == "cogvideox":
        p = cfg.patch_size
        out = dict(
            hidden_states=randn(batch, f, cfg.in_channels, h * p, w * p),  # (B, F, C, H, W)
            encoder_hidden_states=randn(batch, L, cfg.text_embed_dim),
            timestep=ts(),
        )
        if cfg.use_rotary_positional_embeddings:
            from diffusers.models.embeddings import get_3d_rotary_pos_embed
            from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

            crops = get_resize_crop_region_for_grid((h, w), cfg.sample_width // p, cfg.sample_height // p)
            cos, sin = get_3d_rotary_pos_embed(
                embed_dim=cfg.attention_head_dim, crops_coords=crops, grid_size=(h, w), temporal_size=f
            )
            out["image_rotary_emb"] = (cos, sin)
    elif family == "pixart":
        p = cfg.patch_size
        out = dict(
            hidden_states=randn(batch, cfg.in_channels, h * p, w * p),
            encoder_hidden_states=randn(batch, L, cfg.caption_channels),
            timestep=ts(),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        )
        if cfg.use_additional_conditions:  # PixArt-alpha 1024: resolution and aspect ratio
            px_h, px_w = 8 * p * h, 8 * p * w
            out["added_cond_kwargs"] = {
                "resolution": torch.tensor([[px_h, px_w]], dtype=torch.float32).repeat(batch, 1),
                "aspect_ratio": torch.tensor([[px_h / px_w]], dtype=torch.float32).repeat(batch, 1),
            }
    elif family == "hunyuan-dit":
        from diffusers.models.embeddings import get_2d_rotary_pos_embed
        from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid

        p = cfg.patch_size
        L1, L2 = cfg.text_len, cfg.text_len_t5
        head_dim = cfg.attention_head_dim
        base_size = 512 // 8 // p  # what HunyuanDiTPipeline uses
        crops = get_resize_crop_region_for_grid((h, w), base_size)
        image_rotary_emb = get_2d_rotary_pos_embed(head_dim, crops, (h, w), output_type="pt")
        size_ids = torch.tensor([[1024, 1024, 8 * p * h, 8 * p * w, 0, 0]], dtype=torch.float32)
        out = dict(
            hidden_states=randn(batch, cfg.in_channels, h * p, w * p),
            timestep=ts(),
            encoder_hidden_states=randn(batch, L1, cfg.cross_attention_dim),
            encoder_hidden_states_t5=randn(batch, L2, cfg.cross_attention_dim_t5),
            text_embedding_mask_t5=torch.ones(batch, L2, dtype=torch.long),
            image_meta_size=size_ids.repeat(batch, 1),
            style=torch.zeros(batch, dtype=torch.long),
            image_rotary_emb=image_rotary_emb,
        )
    elif family == "wan":
        pt, ph, pw = cfg.patch_size
        out = dict(
            hidden_states=randn(batch, cfg.in_channels, f * pt, h * ph, w * pw),
            timestep=ts(),
            encoder_hidden_states=randn(batch, L, cfg.text_dim),
        )
    elif family == "flux":
        ids = torch.zeros(h, w, 3)
        ids[..., 1] = torch.arange(h)[:, None]
        ids[..., 2] = torch.arange(w)[None, :]
        out = dict(
            hidden_states=randn(batch, h * w, cfg.in_channels),  # packed latents
            encoder_hidden_states=randn(batch, L, cfg.joint_attention_dim),
            pooled_projections=randn(batch, cfg.pooled_projection_dim),
            timestep=ts(),  # FluxPipeline passes t / 1000
            img_ids=ids.reshape(h * w, 3),
            txt_ids=torch.zeros(L, 3),
        )
        if cfg.guidance_embeds:
            out["guidance"] = torch.full((batch,), 3.5)
    elif family == "hunyuanvideo":
        p, pt = cfg.patch_size, cfg.patch_size_t
        out = dict(
            hidden_states=randn(batch, cfg.in_channels, f * pt, h * p, w * p),
            timestep=ts(),
            encoder_hidden_states=randn(batch, L, cfg.text_embed_dim),
            pooled_projections=randn(batch, cfg.pooled_projection_dim),
        )
        if cfg.guidance_embeds:
            out["guidance"] = torch.full((batch,), 6.0 * 1000.0)  # pipeline: guidance_scale * 1000
    elif family == "ltx-video":
        if cfg.patch_size != 1 or cfg.patch_size_t != 1:
            raise InputError("forward_inputs packs LTX latents for patch size 1 only")
        out = dict(
            hidden_states=randn(batch, f * h * w, cfg.in_channels),  # packed latents
            encoder_hidden_states=randn(batch, L, cfg.caption_channels),
            timestep=ts(),
            num_frames=f,
            height=h,
            width=w,
            # LTXPipeline: (vae temporal compression / frame_rate, spatial, spatial)
            rope_interpolation_scale=(8 / 25, 32, 32),
        )
    else:  # pragma: no cover
        raise InputError(family)
    if row.text_mask_arg:  # the mask of the text argument the row names
        out[row.text_mask_arg] = text_mask(batch, out[row.text_from].shape[1], text_padding)

    # Cast to the model dtype what the pipelines cast; RoPE tables, masks and the Wan/LTX/
    # CogVideoX/PixArt timesteps keep their own dtype, as in the pipelines.
    cast = {"hidden_states", "encoder_hidden_states", "encoder_hidden_states_t5", "pooled_projections"}
    if row.timestep_dtype == "model":
        cast |= {"timestep", "guidance", "image_meta_size"}

    def move(x, to_dtype):
        if isinstance(x, torch.Tensor):
            return x.to(device=device, dtype=dtype) if to_dtype and x.is_floating_point() else x.to(device)
        if isinstance(x, (tuple, list)):
            return type(x)(move(v, to_dtype) for v in x)
        if isinstance(x, dict):
            return {k: move(v, to_dtype) for k, v in x.items()}
        return x

    out = {k: move(v, k in cast) for k, v in out.items()}
    out["return_dict"] = False
    return out


def set_timestep(kwargs: dict, family: str, t: float) -> dict:
    """Replace ``kwargs["timestep"]`` by the one for time ``t`` (same batch, device, dtype)."""
    old = kwargs["timestep"]
    kwargs["timestep"] = timestep_tensor(family, t, old.shape[0], old.device, old.dtype)
    return kwargs
