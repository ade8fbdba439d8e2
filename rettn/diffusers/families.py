"""Per-family facts as data: one row per diffusion-transformer architecture.

A row lists the model classes that share the architecture, which attention modules are
self-attention (or joint text + image/video attention) and which are cross-attention, where the
conditioning (text) tokens sit in the self-attention sequence, how to read the token grid
(frames, height, width) from the transformer's forward arguments, how its timestep runs, and
its presets (with the rule that picks one by the model's variant). A new DiT is one row here, not
a new processor. Facts were checked on diffusers 0.42.1 with tiny models (tests/tiny_models.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import torch

from rettn.errors import UnsupportedModelError


def _patch(config, name, default):
    p = getattr(config, name, default)
    return default if p is None else p


def grid_b_f_c_h_w(model, args):
    """CogVideoX, ConsisID, AnyFlow: hidden_states (B, F, C, H, W), patch_size (+ patch_size_t)."""
    x = args.get("hidden_states")
    p = _patch(model.config, "patch_size", 2)
    if isinstance(p, (tuple, list)):
        pt, ph, pw = p
        return x.shape[1] // pt, x.shape[3] // ph, x.shape[4] // pw
    pt = getattr(model.config, "patch_size_t", None)
    f = x.shape[1] if pt is None else math.ceil(x.shape[1] / pt)
    return f, x.shape[3] // p, x.shape[4] // p


def grid_channels_first(model, args):
    """hidden_states (B, C, H, W) (PixArt, SD3, ...) or (B, C, F, H, W) (Wan, HunyuanVideo, ...);
    patch_size (t, h, w), (h, w) or p, with patch_size_t."""
    x = args.get("hidden_states")
    p = _patch(model.config, "patch_size", 2)
    if x.dim() == 4:
        ph, pw = (p[-2], p[-1]) if isinstance(p, (tuple, list)) else (p, p)
        return 1, x.shape[2] // ph, x.shape[3] // pw
    if isinstance(p, (tuple, list)) and len(p) == 3:
        pt, ph, pw = p
    else:
        ph, pw = (p[-2], p[-1]) if isinstance(p, (tuple, list)) else (p, p)
        pt = _patch(model.config, "patch_size_t", 1)
    return x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw


def grid_b_f_h_w_c(model, args):
    """Kandinsky 5 / 6: hidden_states (B, F, H, W, C), patch_size (t, h, w)."""
    x = args.get("hidden_states")
    pt, ph, pw = _patch(model.config, "patch_size", (1, 2, 2))
    return x.shape[1] // pt, x.shape[2] // ph, x.shape[3] // pw


def grid_img_ids(model, args):
    """Flux family: packed (B, S, C) latents with img_ids (S, 3) = (0, row, col), or (B, S, 4) /
    (S, 4) = (t, row, col, l) for Flux 2 / 3. Reference latents (Kontext) make the grid unreadable."""
    ids = args.get("img_ids")
    if ids is None:
        return None
    ids = ids[0] if ids.dim() == 3 else ids
    if ids.shape[-1] >= 4 and int(ids[:, 0].max()) != int(ids[:, 0].min()):
        return None  # several images (a reference next to the target)
    if ids.shape[-1] == 3 and int(ids[:, 0].max()) != 0:
        return None
    return 1, int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1


def grid_img_shapes(model, args):
    """Qwen-Image: img_shapes[b] = [(frames, height, width), ...] in tokens, the target first; a
    reference image (Edit) makes the sequence more than one grid."""
    shapes = args.get("img_shapes")
    if not shapes:
        return None
    first = shapes[0] if isinstance(shapes[0], (list, tuple)) and shapes[0] and isinstance(shapes[0][0], (list, tuple)) else shapes
    if len(first) != 1:
        return None
    return tuple(int(v) for v in first[0])


def grid_ltx_kwargs(model, args):
    """LTX-Video, LTX-2: the latent grid passed as forward kwargs num_frames / height / width."""
    f, h, w = args.get("num_frames"), args.get("height"), args.get("width")
    if f is None or h is None or w is None:
        return None
    p, pt = _patch(model.config, "patch_size", 1), _patch(model.config, "patch_size_t", 1)
    return int(f) // pt, int(h) // p, int(w) // p


def no_grid(model, args):
    return None


@dataclass(frozen=True)
class Family:
    """One architecture's facts.

    classes: diffusers model class names that share the architecture.
    self_attention / cross_attention: regexes over attention module names (``named_modules``).
    text: where text tokens sit in the self-attention sequence: "first", "last" or None (none,
        or the model keeps them in cross-attention).
    conditioning: how many tokens stay dense: "text" (the length of the ``text_from`` argument)
        or "non-grid" (every token outside the image/video grid: register tokens, padding, a
        second text encoder's tokens all sit on the text's side).
    kv_text: for attention whose queries are the image tokens and whose keys are [text, image]
        ("first") or [image, text] ("last"): the side of the extra (dense) keys.
    grid: reads (frames, height, width) in tokens from (model, bound forward arguments).
    text_from: the forward argument whose dim 1 is the text length.
    presets: preset names; variants: (preset, {key: value}) rules, the first whose keys all
        match wins (a key is a config field of the model, or "pipeline" for the pipeline's class
        name, or "transformer_2" for whether the pipeline has a second transformer), else
        presets[0]; a preset named in the model's Hub id wins over both.
    timestep: "falling" (1000 -> 0, or 1 -> 0) or "rising" (Z-Image); timestep_end: where it ends
        (for a bare transformer's progress); timestep_arg: the forward argument that holds it.
    timestep_scale: the timestep runs over [0, timestep_scale] (1000, or 1 for Flux's t / 1000);
        timestep_dtype: the tensor its pipeline passes, "long", "float32" or "model" (the model's
        dtype). Both are what the profiler's dummy inputs build.
    image: an image model (a token grid of one frame). text_mask_arg: the forward argument that
        takes the text's attention mask, if any.
    linear: its self-attention is linear attention (no softmax): rettn refuses it.
    """

    name: str
    classes: tuple[str, ...]
    self_attention: str
    cross_attention: str | None
    text: str | None
    grid: Callable = no_grid
    text_from: str = "encoder_hidden_states"
    presets: tuple[str, ...] = ()
    variants: tuple = ()
    timestep: str = "falling"
    timestep_end: float = 0.0
    timestep_arg: str = "timestep"
    timestep_scale: float = 1000.0
    timestep_dtype: str = "float32"
    image: bool = False
    text_mask_arg: str | None = None
    conditioning: str = "text"
    kv_text: str | None = None
    linear: bool = False
    generic: bool = False
    notes: str = ""


_F = Family
_JOINT = r"(single_)?transformer_blocks\.\d+\.attn"
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        _F("cogvideox", ("CogVideoXTransformer3DModel", "ConsisIDTransformer3DModel"),
           r"transformer_blocks\.\d+\.attn1", r"perceiver_cross_attention\.\d+", "first", grid_b_f_c_h_w,
           presets=("cogvideox-2b", "cogvideox-5b", "tiny-shapes"),
           variants=(("cogvideox-5b", {"num_attention_heads": 48}), ("tiny-shapes", {"pipeline": "TinyVideoPipeline"})),
           timestep_dtype="long"),
        _F("cogview", ("CogView3PlusTransformer2DModel", "CogView4Transformer2DModel", "GlmImageTransformer2DModel"),
           r"transformer_blocks\.\d+\.attn1", None, "first", grid_channels_first, presets=("cogview4",), image=True),
        _F("easyanimate", ("EasyAnimateTransformer3DModel",), r"transformer_blocks\.\d+\.attn1", None, "first",
           grid_channels_first),
        _F("pixart", ("PixArtTransformer2DModel",), r"transformer_blocks\.\d+\.attn1",
           r"transformer_blocks\.\d+\.attn2", None, grid_channels_first, presets=("pixart-alpha", "pixart-sigma"),
           variants=(("pixart-sigma", {"pipeline": "PixArtSigmaPipeline"}),
                     ("pixart-alpha", {"pipeline": "PixArtAlphaPipeline"})),
           timestep_dtype="long", image=True, text_mask_arg="encoder_attention_mask"),
        _F("hunyuan-dit", ("HunyuanDiT2DModel",), r"blocks\.\d+\.attn1", r"blocks\.\d+\.attn2", None,
           grid_channels_first, presets=("hunyuan-dit",), timestep_dtype="model", image=True,
           text_mask_arg="text_embedding_mask"),
        _F("dit", ("DiTTransformer2DModel",), r"transformer_blocks\.\d+\.attn1", None, None, grid_channels_first,
           image=True, notes="class-conditional: no text"),
        _F("wan", ("WanTransformer3DModel", "WanVACETransformer3DModel", "WanAnimateTransformer3DModel",
                   "ChronoEditTransformer3DModel", "SkyReelsV2Transformer3DModel", "HeliosTransformer3DModel"),
           r"(vace_)?blocks\.\d+\.attn1", r"(vace_)?blocks\.\d+\.attn2", None, grid_channels_first,
           presets=("wan2.1", "wan2.2"),
           variants=(("wan2.2", {"transformer_2": True}), ("wan2.2", {"in_channels": 48})),
           notes="video self-attention; text (and I2V image tokens) in cross-attention"),
        _F("anyflow", ("AnyFlowTransformer3DModel",), r"blocks\.\d+\.attn1", r"blocks\.\d+\.attn2", None,
           grid_b_f_c_h_w, presets=("wan2.1",)),
        _F("flux", ("FluxTransformer2DModel", "ChromaTransformer2DModel", "BriaTransformer2DModel",
                    "BriaFiboTransformer2DModel", "LongCatImageTransformer2DModel", "OvisImageTransformer2DModel"),
           _JOINT, None, "first", grid_img_ids, presets=("flux",), timestep_scale=1.0, timestep_dtype="model",
           image=True),
        _F("flux2", ("Flux2Transformer2DModel", "Flux3Transformer2DModel"), _JOINT, None, "first", grid_img_ids,
           presets=("flux2",), timestep_scale=1.0, timestep_dtype="model", image=True),
        _F("qwen-image", ("QwenImageTransformer2DModel",), r"transformer_blocks\.\d+\.attn", None, "first",
           grid_img_shapes, presets=("qwen-image",), image=True),
        _F("qwen-image21", ("QwenImage21Transformer2DModel",), r"transformer_blocks\.\d+\.attn", None, None,
           grid_img_shapes, kv_text="first", presets=("qwen-image",),
           notes="image queries over [text, image] keys, after a causal text-only call"),
        _F("prx", ("PRXTransformer2DModel",), r"blocks\.\d+\.attention", None, None, grid_channels_first,
           kv_text="first", notes="image queries over [text, image] keys"),
        _F("nucleusmoe", ("NucleusMoEImageTransformer2DModel",), r"transformer_blocks\.\d+\.attn", None, None,
           grid_img_shapes, kv_text="last", notes="image queries over [image, text] keys"),
        _F("hunyuanvideo", ("HunyuanVideoTransformer3DModel", "HunyuanVideoFramepackTransformer3DModel",
                            "HunyuanImageTransformer2DModel", "MotifVideoTransformer3DModel"),
           _JOINT, None, "last", grid_channels_first, presets=("hunyuanvideo",), timestep_dtype="model",
           text_mask_arg="encoder_attention_mask"),
        _F("hunyuanvideo15", ("HunyuanVideo15Transformer3DModel",), r"transformer_blocks\.\d+\.attn", None, "last",
           grid_channels_first, conditioning="non-grid", presets=("hunyuanvideo15",),
           notes="[video, image, byT5, text, padding] per sample"),
        _F("joyimage", ("JoyImageEditTransformer3DModel",), r"double_blocks\.\d+\.attn", None, "last",
           grid_channels_first),
        _F("ltx-video", ("LTXVideoTransformer3DModel",), r"transformer_blocks\.\d+\.attn1",
           r"transformer_blocks\.\d+\.attn2", None, grid_ltx_kwargs, presets=("ltx-video",),
           text_mask_arg="encoder_attention_mask"),
        _F("ltx2", ("LTX2VideoTransformer3DModel",), r"transformer_blocks\.\d+\.(audio_)?attn1",
           r"transformer_blocks\.\d+\.(attn2|audio_attn2|audio_to_video_attn|video_to_audio_attn)", None,
           grid_ltx_kwargs, presets=("ltx2",), notes="video and audio self-attention; cross-attention dense"),
        _F("sd3", ("SD3Transformer2DModel",), r"transformer_blocks\.\d+\.attn2?", None, "last", grid_channels_first,
           presets=("sd3",), image=True, notes="SD3.5's attn2 is image-only self-attention"),
        _F("auraflow", ("AuraFlowTransformer2DModel",), r"(joint_|single_)transformer_blocks\.\d+\.attn", None,
           "first", grid_channels_first, conditioning="non-grid", notes="register tokens before the text"),
        _F("cosmos", ("CosmosTransformer3DModel",), r"transformer_blocks\.\d+\.attn1",
           r"transformer_blocks\.\d+\.attn2", None, grid_channels_first, presets=("wan2.1",)),
        _F("mochi", ("MochiTransformer3DModel",), r"transformer_blocks\.\d+\.attn1", None, "last",
           grid_channels_first, presets=("mochi",), timestep="rising", timestep_end=1000.0,
           notes="one attention call per sample over [video, its valid text]"),
        _F("allegro", ("AllegroTransformer3DModel",), r"transformer_blocks\.\d+\.attn1",
           r"transformer_blocks\.\d+\.attn2", None, grid_channels_first),
        _F("latte", ("LatteTransformer3DModel",), r"(transformer_blocks|temporal_transformer_blocks)\.\d+\.attn1",
           r"transformer_blocks\.\d+\.attn2", None, no_grid,
           notes="spatial attention per frame, temporal attention per pixel (short)"),
        _F("kandinsky", ("Kandinsky5Transformer3DModel", "Kandinsky6Transformer3DModel"),
           r"visual_transformer_blocks\.\d+\.(video_dec_block\.)?self_attention",
           r"visual_transformer_blocks\.\d+\.(video_dec_block\.)?cross_attention", None, grid_b_f_h_w_c),
        _F("z-image", ("ZImageTransformer2DModel",), r"(layers|noise_refiner)\.\d+\.attention", None, "last",
           no_grid, text_from="cap_feats", timestep="rising", timestep_end=1.0, timestep_arg="t", presets=("z-image",),
           timestep_scale=1.0, image=True,
           notes="text-only context_refiner stays dense; text padded to a multiple of 32"),
        _F("lumina2", ("Lumina2Transformer2DModel",), r"(layers|noise_refiner)\.\d+\.attn", None, "first",
           grid_channels_first, timestep="rising", timestep_end=1.0),
        _F("lumina-next", ("LuminaNextDiT2DModel",), r"layers\.\d+\.attn1", r"layers\.\d+\.attn2", None,
           grid_channels_first, timestep="rising", timestep_end=1.0),
        _F("hidream", ("HiDreamImageTransformer2DModel",), r"(double|single)_stream_blocks\.\d+\.block\.attn1", None,
           "last", grid_channels_first, conditioning="non-grid", text_from="encoder_hidden_states_t5",
           timestep_arg="timesteps",
           notes="[image, T5, llama] text"),
        _F("omnigen", ("OmniGenTransformer2DModel",), r"layers\.\d+\.self_attn", None, "first",
           grid_channels_first, conditioning="non-grid", timestep="rising", timestep_end=1.0,
           notes="its full attention mask keeps it dense"),
        _F("ernie-image", ("ErnieImageTransformer2DModel",), r"layers\.\d+\.self_attention", None, "last",
           grid_channels_first, text_from="text_bth"),
        _F("krea2", ("Krea2Transformer2DModel",), r"transformer_blocks\.\d+\.attn", None, "first", no_grid),
        _F("ideogram4", ("Ideogram4Transformer2DModel",), r"layers\.\d+\.attention", None, "first", no_grid,
           notes="text and image in one hidden_states; a full mask keeps it dense"),
        _F("sana", ("SanaTransformer2DModel", "SanaVideoTransformer3DModel"), r"transformer_blocks\.\d+\.attn1",
           r"transformer_blocks\.\d+\.attn2", None, grid_channels_first, linear=True,
           notes="self-attention is linear attention (ReLU kernels, no softmax)"),
    ]
}

# Unknown models with softmax attention get this row: an attention call is self-attention when
# its keys are as many as its queries; no conditioning tokens are kept dense.
GENERIC = Family("generic", (), r".*", None, None, generic=True)


def read_grid(family: Family, model, args: dict):
    """(frames, height, width) in tokens, or None when the forward arguments do not say."""
    try:
        grid = family.grid(model, args)
    except (AttributeError, IndexError, TypeError, ValueError):
        return None
    return tuple(int(g) for g in grid) if grid is not None else None


def text_length(family: Family, args: dict) -> int:
    t = args.get(family.text_from)
    return int(t.shape[1]) if isinstance(t, torch.Tensor) and t.dim() >= 2 else 0


def supported_families() -> list[str]:
    return sorted(FAMILIES)


def family_of_class(cls_name: str) -> Family | None:
    for f in FAMILIES.values():
        if cls_name in f.classes:
            return f
    return None


def detect_family(model) -> Family:
    """The family row of a transformer (by its class or a base class), or the generic row for
    an unknown model (:func:`generic_warning` says what it assumes). Linear-attention models are
    refused with a ValueError that says why."""
    for cls in type(model).__mro__:
        family = family_of_class(cls.__name__)
        if family is not None:
            break
    else:
        family = GENERIC
    if family.linear:
        raise UnsupportedModelError(
            f"rettn cannot sparsify {type(model).__name__}: its self-attention is linear attention "
            f"({family.notes or 'no softmax'}). Re-ttention reshapes a softmax: rho and R are shares of a "
            "softmax denominator and output, which linear attention does not have"
        )
    return family


def generic_warning(model) -> str:
    return (
        f"rettn does not know {type(model).__name__} and uses its generic path: an attention call "
        "whose keys are as many as its queries is treated as self-attention and runs sparse (top-k); "
        "other calls stay dense; no text/conditioning tokens are kept dense (their position in the "
        "sequence is unknown); frame_window needs a token grid it cannot read. handle.describe() "
        "shows what each module did"
    )


def classify(family: Family, module_name: str) -> str | None:
    """'self' (self/joint attention), 'cross', or None (not touched) for an attention module."""
    if re.fullmatch(family.self_attention, module_name):
        return "self"
    if family.cross_attention and re.fullmatch(family.cross_attention, module_name):
        return "cross"
    return None


def _model_id(*objs) -> str:
    for obj in objs:
        config = getattr(obj, "config", None)
        name = getattr(config, "_name_or_path", None) if config is not None else None
        if isinstance(name, str) and name:
            return name
    return ""


def default_preset(family: Family, model, pipeline=None) -> str | None:
    """The preset for this model's variant: the first ``variants`` rule whose config fields all
    match (a preset named in the pipeline's or model's Hub id wins over the rules), else the
    family's first preset; None for families without presets."""
    if not family.presets:
        return None
    model_id = _model_id(pipeline, model).lower().replace("_", "-")
    named = [p for p in family.presets if p.replace(".", "").replace("-", "") in model_id.replace(".", "").replace("-", "")]
    if named:
        return max(named, key=len)
    config = getattr(model, "config", None)

    def facts(key):
        if key == "pipeline":
            return type(pipeline).__name__
        if key == "transformer_2":
            return getattr(pipeline, "transformer_2", None) is not None
        return getattr(config, key, object())

    for preset, fields in family.variants:
        if all(facts(key) == value for key, value in fields.items()):
            return preset
    return family.presets[0]


def table_markdown() -> str:
    """The supported-families table of docs/usage.md, generated from :data:`FAMILIES`
    (tests/test_families_all.py checks that the docs hold exactly this table)."""
    def regex(r):
        return "-" if r is None else "`" + r.replace("|", "\\|") + "`"

    lines = ["| family | model classes | self / joint attention (sparse) | cross-attention (dense) | "
             "conditioning tokens kept dense | presets | notes |",
             "|---|---|---|---|---|---|---|"]
    for f in FAMILIES.values():
        if f.linear:
            cond = "refused: linear attention"
        elif f.kv_text:
            cond = f"text keys ({f.kv_text}) of image-query attention"
        elif f.text:
            cond = f"text {f.text}" + (" (+ every non-grid token)" if f.conditioning == "non-grid" else "")
        else:
            cond = "-"
        lines.append(f"| {f.name} | {', '.join(f'`{c}`' for c in f.classes)} | {regex(f.self_attention)} | "
                     f"{regex(f.cross_attention)} | {cond} | {', '.join(f.presets) or '-'} | {f.notes or '-'} |")
    return "\n".join(lines)
