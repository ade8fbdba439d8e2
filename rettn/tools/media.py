"""Writing generated images and videos: PNG/JPEG for images, MP4/GIF for videos."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from rettn.errors import UsageError

IMAGE_EXTS = (".png", ".jpg", ".jpeg")
VIDEO_EXTS = (".mp4", ".gif")


def check_extension(path: str | Path, is_video: bool) -> str:
    """The lower-case extension, or a UsageError (a ValueError) saying which ones this kind of output takes."""
    ext = Path(path).suffix.lower()
    allowed = VIDEO_EXTS if is_video else IMAGE_EXTS
    if ext not in allowed:
        kind = "a video" if is_video else "an image"
        raise UsageError(f"cannot write {kind} to '{path}': use one of {', '.join(allowed)}")
    if ext == ".mp4":
        try:
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise UsageError("writing MP4 needs imageio-ffmpeg (pip install imageio-ffmpeg); or use .gif") from None
    return ext


def to_uint8(frames, upscale: int = 1) -> np.ndarray:
    """Float frames in [0, 1], (..., H, W, 3), to uint8, optionally enlarged by nearest neighbour."""
    arr = np.clip(np.asarray(frames, dtype=np.float32), 0.0, 1.0)
    arr = (arr * 255 + 0.5).astype(np.uint8)
    if upscale > 1:
        arr = arr.repeat(upscale, axis=-3).repeat(upscale, axis=-2)
    return arr


def side_by_side(*clips, gap: int = 2) -> np.ndarray:
    """Clips (..., H, W, 3) of equal shape joined left to right with a white gap."""
    parts = []
    for i, c in enumerate(clips):
        if i:
            parts.append(np.ones((*c.shape[:-2], gap, 3), dtype=c.dtype))
        parts.append(c)
    return np.concatenate(parts, axis=-2)


def write(path: str | Path, data, is_video: bool, fps: int = 8, upscale: int = 1) -> Path:
    """Write frames (F, H, W, 3) or an image (H, W, 3), floats in [0, 1]."""
    path = Path(path)
    ext = check_extension(path, is_video)
    arr = to_uint8(data, upscale)
    path.parent.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    if not is_video:
        Image.fromarray(arr).save(path)
    elif ext == ".gif":
        frames = [Image.fromarray(f) for f in arr]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    else:
        import imageio.v3 as iio

        iio.imwrite(path, arr, fps=fps, codec="libx264", macro_block_size=1)
    return path


def slug(text: str, limit: int = 48) -> str:
    """A file-name-safe short form of a prompt."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:limit].rstrip("-") or "prompt"
