"""rettn's embedded default model: a tiny text-to-video pipeline that runs offline on a CPU.

    import rettn.tiny
    pipe = rettn.tiny.load_default_pipeline()                  # TinyVideoPipeline, CPU, float32
    video = pipe("a red circle moving right", generator=torch.Generator().manual_seed(0)).frames[0]
    # video: (4, 32, 32, 3) float in [0, 1]

The weights in ``rettn/tiny/weights`` are produced by ``scripts/train_tiny.py`` (a pixel-space
``CogVideoXTransformer3DModel`` with 3D RoPE, 4 frames x 32 x 32 = 1,024 video tokens per clip,
trained on coloured circles, squares and triangles moving left, right, up or down). The caption
vocabulary is in :mod:`rettn.tiny.pipeline` (``COLOURS``, ``SHAPES``, ``DIRECTIONS``,
``all_captions()``).

Importing this package is cheap; diffusers and transformers load on first use.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["TinyVideoPipeline", "TinyVideoPipelineOutput", "default_model_path", "load_default_pipeline"]


def default_model_path() -> Path:
    """The folder of the shipped weights (a ``save_pretrained`` directory)."""
    return Path(__file__).resolve().parent / "weights"


def load_default_pipeline(device="cpu", dtype=None):
    """The shipped :class:`TinyVideoPipeline`, on ``device`` in ``dtype`` (default float32).

    Loads offline from :func:`default_model_path`. Raises ``FileNotFoundError`` when the weights
    are missing (they are made by ``python scripts/train_tiny.py``).
    """
    import torch

    from .pipeline import TinyVideoPipeline

    path = default_model_path()
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"no tiny model weights at {path}; train them with `python scripts/train_tiny.py --out {path}`"
        )
    pipe = TinyVideoPipeline.from_pretrained(str(path), local_files_only=True)  # float32, as saved
    dtype = dtype or torch.float32
    for module in (pipe.text_encoder, pipe.transformer):
        module.to(torch.device(device))
        if module.dtype != dtype:  # (diffusers warns on any dtype cast, even a no-op one)
            module.to(dtype=dtype)
    return pipe


def __getattr__(name):  # lazy: importing rettn.tiny does not import diffusers
    if name in ("TinyVideoPipeline", "TinyVideoPipelineOutput"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
