"""Per-family facts as data: one row per diffusion-transformer family.

A row says which attention modules are self-attention (or joint text+video attention), where the
conditioning (text) tokens sit in that sequence, and how to read the token grid (frames, height,
width) from the transformer's forward arguments. A new DiT is one row here, not a new processor.
Facts were checked on diffusers 0.42.1 with tiny models (see tests/tiny_models.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Family:
    name: str
    model_classes: tuple[str, ...]
    self_attention: str  # regex over attn_processors names (without ".processor"): self / joint
    cross_attention: str | None  # regex for cross-attention modules (dense unless configured)
    text: str | None  # where text sits in the self-attention sequence: "first", "last" or None
    grid: str  # name of the grid reader in GRID_READERS
    text_from: str = "encoder_hidden_states"  # forward argument whose dim 1 is the text length
    presets: tuple[str, ...] = ()


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("cogvideox", ("CogVideoXTransformer3DModel",), r"transformer_blocks\.\d+\.attn1",
               None, "first", "b_f_c_h_w", presets=("cogvideox-2b", "cogvideox-5b")),
        Family("pixart", ("PixArtTransformer2DModel",), r"transformer_blocks\.\d+\.attn1",
               r"transformer_blocks\.\d+\.attn2", None, "b_c_h_w", presets=("pixart-alpha", "pixart-sigma")),
        Family("hunyuan-dit", ("HunyuanDiT2DModel",), r"blocks\.\d+\.attn1", r"blocks\.\d+\.attn2",
               None, "b_c_h_w", presets=("hunyuan-dit",)),
        Family("wan", ("WanTransformer3DModel",), r"blocks\.\d+\.attn1", r"blocks\.\d+\.attn2",
               None, "b_c_f_h_w", presets=("wan2.1",)),
        Family("flux", ("FluxTransformer2DModel",), r"(single_)?transformer_blocks\.\d+\.attn",
               None, "first", "img_ids", presets=("flux",)),
        Family("hunyuanvideo", ("HunyuanVideoTransformer3DModel",),
               r"(single_)?transformer_blocks\.\d+\.attn", None, "last", "b_c_f_h_w",
               presets=("hunyuanvideo",)),
        Family("ltx-video", ("LTXVideoTransformer3DModel",), r"transformer_blocks\.\d+\.attn1",
               r"transformer_blocks\.\d+\.attn2", None, "ltx_kwargs", presets=("ltx-video",)),
    ]
}

# Unknown models whose attention processors are all diffusers' standard ones get this row:
# a call is self-attention when the processor gets no encoder_hidden_states.
GENERIC = Family("generic", (), r".*", None, None, "none")
STANDARD_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor", "FusedAttnProcessor2_0")


def _patch(config, name, default):
    p = getattr(config, name, default)
    return default if p is None else p


def _b_f_c_h_w(model, args):  # CogVideoX: (B, F, C, H, W)
    x = args.get("hidden_states")
    p = _patch(model.config, "patch_size", 2)
    pt = getattr(model.config, "patch_size_t", None)
    f = x.shape[1] if pt is None else math.ceil(x.shape[1] / pt)
    return f, x.shape[3] // p, x.shape[4] // p


def _b_c_h_w(model, args):  # PixArt, Hunyuan-DiT: (B, C, H, W)
    x = args.get("hidden_states")
    p = _patch(model.config, "patch_size", 2)
    return 1, x.shape[2] // p, x.shape[3] // p


def _b_c_f_h_w(model, args):  # Wan, HunyuanVideo: (B, C, F, H, W)
    x = args.get("hidden_states")
    p = _patch(model.config, "patch_size", (1, 2, 2))
    if isinstance(p, (tuple, list)):
        pt, ph, pw = p
    else:
        pt, ph, pw = _patch(model.config, "patch_size_t", 1), p, p
    return x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw


def _img_ids(model, args):  # Flux: packed (B, S, C) with img_ids (S, 3) = (0, row, col)
    ids = args.get("img_ids")
    if ids is None:
        return None
    ids = ids[0] if ids.dim() == 3 else ids
    return 1, int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1


def _ltx_kwargs(model, args):  # LTX-Video: latent grid passed as forward kwargs
    f, h, w = args.get("num_frames"), args.get("height"), args.get("width")
    if f is None or h is None or w is None:
        return None
    p, pt = _patch(model.config, "patch_size", 1), _patch(model.config, "patch_size_t", 1)
    return int(f) // pt, int(h) // p, int(w) // p


GRID_READERS = {
    "b_f_c_h_w": _b_f_c_h_w,
    "b_c_h_w": _b_c_h_w,
    "b_c_f_h_w": _b_c_f_h_w,
    "img_ids": _img_ids,
    "ltx_kwargs": _ltx_kwargs,
    "none": lambda model, args: None,
}


def read_grid(family: Family, model, args: dict):
    """(frames, height, width) in tokens, or None when the forward arguments do not say."""
    try:
        grid = GRID_READERS[family.grid](model, args)
    except (AttributeError, IndexError, TypeError, ValueError):
        return None
    return tuple(int(g) for g in grid) if grid is not None else None


def text_length(family: Family, args: dict) -> int:
    t = args.get(family.text_from)
    return int(t.shape[1]) if isinstance(t, torch.Tensor) and t.dim() >= 2 else 0


def supported_families() -> list[str]:
    return sorted(FAMILIES)


def detect_family(model) -> Family:
    """The family row for a transformer, the generic row for standard-processor models, or a
    ValueError naming the supported families."""
    cls = type(model).__name__
    for fam in FAMILIES.values():
        if cls in fam.model_classes:
            return fam
    procs = [m.processor for m in model.modules() if hasattr(m, "set_processor") and hasattr(m, "processor")]
    if procs and all(type(p).__name__ in STANDARD_PROCESSORS for p in procs):
        return GENERIC
    raise ValueError(
        f"rettn does not know {cls}; supported families: {supported_families()} (model classes "
        f"{sorted(c for f in FAMILIES.values() for c in f.model_classes)}), or any model whose "
        f"attention processors are all diffusers' standard ones {list(STANDARD_PROCESSORS)}"
    )


def classify(family: Family, module_name: str) -> str | None:
    """'self' (self/joint attention), 'cross', or None (not touched) for an attention module."""
    if re.fullmatch(family.self_attention, module_name):
        return "self"
    if family.cross_attention and re.fullmatch(family.cross_attention, module_name):
        return "cross"
    return None
