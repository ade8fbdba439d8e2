"""Loading pipelines for the command line: the embedded default, a local folder, or a Hub id."""

from __future__ import annotations

import contextlib
import json
import logging
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
        with _quiet_hub_fallback():
            pipe = _pipeline_class(cls_name).from_pretrained(source, **dtype_kwargs(dtype))
    except Exception as e:  # noqa: BLE001 - many libraries, one clear line
        raise ModelLoadError(_load_failure(model, e, hub=source == model)) from None
    return pipe.to(device)


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and every exception it was raised from or while handling."""
    seen, todo = [], [error]
    while todo:
        e = todo.pop()
        if e is not None and all(e is not s for s in seen):
            seen.append(e)
            todo += [e.__cause__, e.__context__]
    return seen


def _network_errors() -> tuple[type, ...]:
    """What the Hub client raises when it cannot reach the Hub (offline mode, no connection, a file
    neither in the cache nor reachable)."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    kinds: list[type] = [OfflineModeIsEnabled, LocalEntryNotFoundError, ConnectionError, TimeoutError]
    try:
        from huggingface_hub.utils import httpx  # the client's HTTP library (httpx, or its fork)

        kinds.append(httpx.TransportError)
    except (ImportError, AttributeError):
        pass
    try:
        import requests

        kinds += [requests.exceptions.ConnectionError, requests.exceptions.Timeout]
    except ImportError:
        pass
    return tuple(kinds)


def _load_failure(model: str, error: Exception, hub: bool) -> str:
    """One line for a model that did not load: for a Hub id that is not cached and cannot be
    fetched, what to do about it; else the first line of the library's message."""
    chain = _chain(error)
    if hub:
        from huggingface_hub import constants
        from huggingface_hub.errors import RepositoryNotFoundError

        if any(isinstance(e, RepositoryNotFoundError) for e in chain):  # the Hub answered: no such (readable) model
            return (f"the Hugging Face Hub has no model '{model}' that this machine may read: check the id, "
                    "or log in (hf auth login) for a private or gated model")
        if any(isinstance(e, _network_errors()) for e in chain):
            why = "the Hub cannot be reached" + (" (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else "")
            return (f"model '{model}' is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}: "
                    f"download it where there is a network (hf download {model}, or huggingface-cli download "
                    f"{model}) into that cache, or pass --model a local pipeline folder (save_pretrained)")
    text = str(error).strip()
    return f"could not load model '{model}': {text.splitlines()[0] if text else type(error).__name__}"


def _drop_hub_fallback(record) -> bool:
    """A logging filter: drops diffusers' "Couldn't connect to the Hub ... Will try to load from
    local cache" warning (when the cache does not hold the model either, the one-line error says so)."""
    return not str(record.getMessage()).startswith("Couldn't connect to the Hub")


@contextlib.contextmanager
def _quiet_hub_fallback():
    logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
    logger.addFilter(_drop_hub_fallback)
    try:
        yield
    finally:
        logger.removeFilter(_drop_hub_fallback)


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
