"""Loading pipelines for the command line: the embedded default, a local folder, or a Hub id."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rettn.errors import UsageError

DEFAULT_MODEL = "embedded"


class ModelLoadError(UsageError):
    """A model that cannot be loaded; the message says why in one line."""


def dtype_kwargs(dtype) -> dict:
    """``from_pretrained``'s dtype argument: ``dtype`` where diffusers has it, else ``torch_dtype``."""
    from diffusers.utils import deprecation_utils

    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def _pipeline_class(name: str):
    if name == "TinyVideoPipeline":
        from rettn.tiny import TinyVideoPipeline

        return TinyVideoPipeline
    from diffusers import DiffusionPipeline

    return DiffusionPipeline


def load_pipeline(model: str | None, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A diffusers pipeline on ``device`` in ``dtype``.

    ``model``: None or ``"embedded"`` for the shipped tiny video model (offline), a local folder
    written by ``save_pretrained`` (with ``model_index.json``), or a Hugging Face Hub id.
    """
    if model in (None, DEFAULT_MODEL):
        from rettn.tiny import load_default_pipeline

        try:
            return load_default_pipeline(device=device, dtype=dtype)
        except FileNotFoundError as e:
            raise ModelLoadError(str(e)) from None
    path = Path(model).expanduser()
    if path.exists():
        index = path / "model_index.json"
        if not path.is_dir() or not index.is_file():
            raise ModelLoadError(f"'{model}' is not a diffusers pipeline folder (no model_index.json in it)")
        try:
            cls_name = json.loads(index.read_text()).get("_class_name", "")
        except (OSError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"'{index}' is not readable JSON: {e}") from None
        source = str(path)
    else:
        if model.count("/") != 1 or model.startswith(("/", ".")):
            raise ModelLoadError(
                f"'{model}' is neither an existing folder nor a Hub id of the form 'owner/name'"
            )
        cls_name, source = "", model
    try:
        pipe = _pipeline_class(cls_name).from_pretrained(source, **dtype_kwargs(dtype))
    except Exception as e:  # noqa: BLE001 - many libraries, one clear line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"could not load model '{model}': {reason}") from None
    return pipe.to(device)


def default_preset(pipe) -> str | None:
    """The preset for a loaded pipeline, from the family table: the preset of the transformer's
    variant (``tiny-shapes`` for the embedded model; None for models without one)."""
    from rettn.diffusers.families import default_preset as family_preset, detect_family

    return family_preset(detect_family(pipe.transformer), pipe.transformer, pipe)


def quiet_progress_bars():
    """No loading bars from diffusers / transformers (for --no-progress)."""
    from diffusers.utils import logging as dlog

    dlog.disable_progress_bar()
    try:
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()
    except ImportError:
        pass
