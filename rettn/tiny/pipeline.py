"""``TinyVideoPipeline``: a tiny text-to-video diffusion pipeline that runs offline on a CPU.

It is rettn's embedded default model (``rettn.tiny.load_default_pipeline()``): a real diffusers
``CogVideoXTransformer3DModel`` with 3D RoPE, in *pixel* space (no VAE), trained by
``scripts/train_tiny.py`` on procedurally generated clips of coloured shapes moving on a dark
background, with captions such as "a red circle moving right".

Components (all saved and loaded by ``save_pretrained`` / ``from_pretrained``, no Hub access):

- ``tokenizer``: a transformers ``T5Tokenizer`` built in memory from the caption words
  (:data:`WORDS`); other words fall back to single characters.
- ``text_encoder``: a tiny ``T5EncoderModel`` (frozen, seeded random weights).
- ``transformer``: ``CogVideoXTransformer3DModel`` with in/out channels 3 (RGB), patch 2,
  temporal compression 1, RoPE: a 4-frame 32x32 clip is 4 x 16 x 16 = 1,024 video tokens,
  after :data:`MAX_TEXT_LEN` text tokens in one joint self-attention.
- ``scheduler``: ``FlowMatchEulerDiscreteScheduler`` (rectified flow; the transformer predicts
  the velocity ``noise - x0``; timesteps are ``sigma * 1000``).

Classifier-free guidance is batched into one transformer call per step ([uncond, cond]) inside
``transformer.cache_context("cond_uncond")``, the way ``CogVideoXPipeline`` does it, so rettn's
step tracking and CFG handling, and diffusers' caches (``enable_cache``), see the same calls as
with a real CogVideoX model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from diffusers import CogVideoXTransformer3DModel, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
from diffusers.pipelines.pipeline_utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

# ------------------------------------------------------------------------------ the captions
#: Caption vocabulary: what the shipped model was trained on. RGB values in [0, 1].
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.12, 0.78, 0.20),
    "blue": (0.15, 0.32, 0.95),
    "yellow": (0.95, 0.85, 0.10),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {  # (dx, dy) in image coordinates (y grows downwards)
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
BACKGROUND: tuple[float, float, float] = (0.08, 0.08, 0.10)

#: Sizes the shipped model was trained at (frames, height, width).
TRAIN_FRAMES, TRAIN_HEIGHT, TRAIN_WIDTH = 4, 32, 32

#: Text tokens per prompt (padded / truncated), as CogVideoX pads to 226.
MAX_TEXT_LEN = 16

WORDS: tuple[str, ...] = (
    ("a", "an", "the", "moving", "shape", "to", "and")
    + tuple(COLOURS)
    + SHAPES
    + tuple(DIRECTIONS)
)


def caption(colour: str, shape: str, direction: str) -> str:
    """The training caption for one clip: ``"a red circle moving right"``."""
    return f"a {colour} {shape} moving {direction}"


def all_captions() -> list[str]:
    """Every caption of the training distribution (colours x shapes x directions)."""
    return [caption(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS]


# ------------------------------------------------------------------------------ components
TEXT_DIM = 32


def build_tokenizer(words=WORDS):
    """A T5 tokenizer (SentencePiece-unigram model via ``tokenizers``) from an in-memory vocab.

    Ids 0, 1, 2 are ``<pad>``, ``</s>``, ``<unk>`` as in T5; every one of ``words`` (default
    :data:`WORDS`) is one piece; anything else falls back to single characters.
    """
    from transformers import T5Tokenizer

    pieces = ["<pad>", "</s>", "<unk>", "\u2581"] + ["\u2581" + w for w in words]
    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"
    pieces += list(chars) + ["\u2581" + c for c in chars]
    seen, vocab = set(), []
    for i, piece in enumerate(pieces):
        if piece in seen:
            continue
        seen.add(piece)
        if i < 3:
            score = 0.0
        elif piece.startswith("\u2581") and len(piece) > 2:
            score = -1.0  # whole words win over their spelling
        else:
            score = -10.0
        vocab.append((piece, score))
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_text_encoder(vocab_size: int, seed: int = 0, umt5: bool = False):
    """A 2-layer T5 (or UMT5, as Wan uses) encoder, d_model :data:`TEXT_DIM`, seeded random
    weights, eval mode, frozen."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_cls(
        vocab_size=vocab_size,
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.eval().requires_grad_(False)


def build_transformer(
    num_layers: int = 4, num_attention_heads: int = 4, attention_head_dim: int = 32, seed: int = 0
) -> CogVideoXTransformer3DModel:
    """The pixel-space CogVideoX transformer (random weights from ``seed``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CogVideoXTransformer3DModel(
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,  # RoPE splits 32 as 8 (t) + 12 (h) + 12 (w)
            in_channels=3,
            out_channels=3,
            time_embed_dim=4 * attention_head_dim,
            text_embed_dim=TEXT_DIM,
            num_layers=num_layers,
            sample_width=TRAIN_WIDTH,  # pixels = "latents" here; the model patchifies by 2
            sample_height=TRAIN_HEIGHT,
            sample_frames=TRAIN_FRAMES,  # temporal compression 1: frames map 1:1 to token frames
            patch_size=2,
            temporal_compression_ratio=1,
            max_text_seq_length=MAX_TEXT_LEN,
            use_rotary_positional_embeddings=True,
            use_learned_positional_embeddings=False,
        )
    return model


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Rectified-flow Euler sampler; shift 3 spends more steps at high noise, where a clip's
    layout (position, direction of motion) is decided. Training samples noise levels to match."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


# ------------------------------------------------------------------------------ the pipeline
@dataclass
class TinyVideoPipelineOutput(BaseOutput):
    """``frames``: np (B, F, H, W, 3) float in [0, 1]; pt (B, F, 3, H, W) in [0, 1]; or pil
    (a list per video of ``PIL.Image`` frames)."""

    frames: Any


class TinyVideoPipeline(DiffusionPipeline):
    """Text-to-video with a pixel-space CogVideoX transformer (see the module docstring).

    >>> pipe = TinyVideoPipeline.from_pretrained(rettn.tiny.default_model_path())
    >>> video = pipe("a red circle moving right", generator=torch.Generator().manual_seed(0)).frames[0]
    """

    model_cpu_offload_seq = "text_encoder->transformer"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    _optional_components: list[str] = []

    def __init__(self, tokenizer, text_encoder, transformer, scheduler):
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, scheduler=scheduler
        )
        self._guidance_scale = 1.0
        self._num_timesteps = 0
        self._current_timestep = None
        self._interrupt = False

    # properties in the style of the diffusers pipelines (read by callbacks)
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def current_timestep(self):
        return self._current_timestep

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def patch_size(self) -> int:
        return int(self.transformer.config.patch_size)

    # -------------------------------------------------------------------------- text
    @torch.no_grad()
    def encode_prompt(self, prompt: str | list[str], device=None, dtype=None) -> torch.Tensor:
        """T5 hidden states (B, :data:`MAX_TEXT_LEN`, d), padded like CogVideoX (no mask)."""
        prompt = [prompt] if isinstance(prompt, str) else list(prompt)
        device = device or self._execution_device
        ids = self.tokenizer(
            prompt,
            padding="max_length",
            max_length=MAX_TEXT_LEN,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids
        embeds = self.text_encoder(ids.to(self.text_encoder.device))[0]
        return embeds.to(device=device, dtype=dtype or self.transformer.dtype)

    # -------------------------------------------------------------------------- RoPE
    def rotary_embedding(self, num_frames: int, height: int, width: int, device=None):
        """(cos, sin) of the 3D RoPE for a (num_frames, height, width) pixel video, computed as
        ``CogVideoXPipeline`` does for CogVideoX 1.0 (spatial VAE factor 1 here)."""
        cfg = self.transformer.config
        p = cfg.patch_size
        grid_h, grid_w = height // p, width // p
        crops = get_resize_crop_region_for_grid((grid_h, grid_w), cfg.sample_width // p, cfg.sample_height // p)
        return get_3d_rotary_pos_embed(
            embed_dim=cfg.attention_head_dim,
            crops_coords=crops,
            grid_size=(grid_h, grid_w),
            temporal_size=num_frames,
            device=device,
        )

    # -------------------------------------------------------------------------- checks
    def check_inputs(
        self,
        prompt,
        negative_prompt,
        num_inference_steps,
        guidance_scale,
        num_frames,
        height,
        width,
        num_videos_per_prompt,
        output_type,
        callback_on_step_end_tensor_inputs,
        latents,
    ) -> None:
        def is_int(x):
            return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

        if isinstance(prompt, str):
            n = 1
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
            n = len(prompt)
        else:
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        if negative_prompt is not None:
            if isinstance(negative_prompt, str):
                pass
            elif isinstance(negative_prompt, (list, tuple)) and all(isinstance(p, str) for p in negative_prompt):
                if len(negative_prompt) != n:
                    raise ValueError(
                        f"negative_prompt has {len(negative_prompt)} entries but prompt has {n}; give one per prompt"
                    )
            else:
                raise ValueError(f"negative_prompt must be None, a string or a list of strings, got {negative_prompt!r}")
        if not is_int(num_inference_steps) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
        if not is_int(num_frames) or num_frames < 1:
            raise ValueError(f"num_frames must be an integer >= 1, got {num_frames!r}")
        p = self.patch_size
        for name, value in (("height", height), ("width", width)):
            if not is_int(value) or value < p or value % p:
                raise ValueError(
                    f"{name} must be a positive multiple of the patch size {p} (one RoPE grid cell per "
                    f"{p}x{p} patch), got {value!r}; the model was trained at "
                    f"{TRAIN_HEIGHT}x{TRAIN_WIDTH}"
                )
        if not is_int(num_videos_per_prompt) or num_videos_per_prompt < 1:
            raise ValueError(f"num_videos_per_prompt must be an integer >= 1, got {num_videos_per_prompt!r}")
        if output_type not in ("np", "pt", "pil"):
            raise ValueError(f"output_type must be 'np', 'pt' or 'pil', got {output_type!r}")
        bad = [k for k in callback_on_step_end_tensor_inputs or () if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {bad} not allowed; choose from {self._callback_tensor_inputs}"
            )
        if latents is not None:
            expected = (n * num_videos_per_prompt, num_frames, self.transformer.config.in_channels, height, width)
            if tuple(latents.shape) != expected:
                raise ValueError(f"latents must have shape {expected} (B, F, C, H, W), got {tuple(latents.shape)}")

    # -------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float = 4.0,
        num_frames: int = TRAIN_FRAMES,
        height: int = TRAIN_HEIGHT,
        width: int = TRAIN_WIDTH,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "np",
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: tuple[str, ...] | list[str] = ("latents",),
        latents: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        """Generate videos.

        prompt: a caption or a list of captions (one video each, times ``num_videos_per_prompt``).
        negative_prompt: the unconditional text for CFG (default: the empty caption, which is
            what training dropped captions to).
        guidance_scale: CFG weight; <= 1 turns CFG off (one branch per step).
        generator: seeds the initial noise (drawn on the CPU for a CPU generator, so a seed gives
            the same noise on any device).
        latents: optional initial noise (B, F, 3, H, W), instead of drawing it.
        callback_on_step_end: ``fn(pipe, step, timestep, callback_kwargs) -> dict`` after each
            step; ``callback_kwargs`` holds ``callback_on_step_end_tensor_inputs``; returned
            ``latents`` replace the current ones.
        Returns :class:`TinyVideoPipelineOutput` (or a tuple ``(frames,)`` when not
        ``return_dict``).
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        callback_on_step_end_tensor_inputs = list(callback_on_step_end_tensor_inputs or ())
        self.check_inputs(
            prompt,
            negative_prompt,
            num_inference_steps,
            guidance_scale,
            num_frames,
            height,
            width,
            num_videos_per_prompt,
            output_type,
            callback_on_step_end_tensor_inputs,
            latents,
        )
        self._guidance_scale = float(guidance_scale)
        self._interrupt = False
        self._current_timestep = None

        device = self._execution_device
        dtype = self.transformer.dtype
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch = len(prompts) * num_videos_per_prompt

        # 1. text
        prompt_embeds = self.encode_prompt(prompts, device, dtype).repeat_interleave(num_videos_per_prompt, 0)
        negative_prompt_embeds = None
        if self.do_classifier_free_guidance:
            if negative_prompt is None:
                negative_prompt = ""
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            negative_prompt_embeds = self.encode_prompt(negatives, device, dtype).repeat_interleave(
                num_videos_per_prompt, 0
            )

        # 2. timesteps
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)

        # 3. initial noise (float32; the transformer gets its own dtype)
        shape = (batch, num_frames, self.transformer.config.in_channels, height, width)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        else:
            latents = latents.to(device=device, dtype=torch.float32)

        # 4. RoPE
        image_rotary_emb = self.rotary_embedding(num_frames, height, width, device=device)

        # 5. denoising loop
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                if self.do_classifier_free_guidance:
                    model_input = torch.cat([latents, latents])
                    text = torch.cat([negative_prompt_embeds, prompt_embeds])
                else:
                    model_input, text = latents, prompt_embeds
                timestep = t.expand(model_input.shape[0])
                with self.transformer.cache_context("cond_uncond"):  # as CogVideoXPipeline: one batched call
                    velocity = self.transformer(
                        hidden_states=model_input.to(dtype),
                        encoder_hidden_states=text,
                        timestep=timestep,
                        image_rotary_emb=image_rotary_emb,
                        return_dict=False,
                    )[0].float()
                if self.do_classifier_free_guidance:
                    uncond, cond = velocity.chunk(2)
                    velocity = uncond + self.guidance_scale * (cond - uncond)
                latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]

                if callback_on_step_end is not None:
                    local = {
                        "latents": latents,
                        "prompt_embeds": prompt_embeds,
                        "negative_prompt_embeds": negative_prompt_embeds,
                    }
                    callback_kwargs = {k: local[k] for k in callback_on_step_end_tensor_inputs}
                    outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    latents = outputs.pop("latents", latents)
                    prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                progress_bar.update()
        self._current_timestep = None

        # 6. pixels
        video = (latents / 2 + 0.5).clamp(0, 1)  # (B, F, 3, H, W)
        if output_type == "pt":
            frames = video
        else:
            array = video.permute(0, 1, 3, 4, 2).cpu().numpy()  # (B, F, H, W, 3)
            if output_type == "np":
                frames = array
            else:
                from PIL import Image

                frames = [[Image.fromarray((f * 255).round().astype(np.uint8)) for f in clip] for clip in array]
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return TinyVideoPipelineOutput(frames=frames)


def build_pipeline(num_layers: int = 4, num_attention_heads: int = 4, attention_head_dim: int = 32, seed: int = 0):
    """A fresh, untrained pipeline (what ``scripts/train_tiny.py`` starts from)."""
    tokenizer = build_tokenizer()
    pipe = TinyVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=build_text_encoder(len(tokenizer), seed),
        transformer=build_transformer(num_layers, num_attention_heads, attention_head_dim, seed),
        scheduler=build_scheduler(),
    )
    return pipe
