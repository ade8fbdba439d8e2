"""The FlexAttention backend: ``torch.nn.attention.flex_attention`` over a layout's ``BlockMask``
(compiled on CUDA, and on CPU when no lse is asked for), with the lse the way this torch returns it."""

from __future__ import annotations

import functools
import warnings

import torch

from rettn.errors import UnsupportedError


def flex_function():
    """torch's ``flex_attention`` (eager), or UnsupportedError on a torch without it."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as e:  # pragma: no cover - torch >= 2.5 has it
        raise UnsupportedError("backend='flex' needs torch >= 2.5 (torch.nn.attention.flex_attention)") from e
    return flex_attention


def available() -> bool:
    """Whether this torch has ``torch.nn.attention.flex_attention``."""
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _compiled():
    return torch.compile(flex_function(), dynamic=False)


def _call(fn, q, k, v, block_mask, scale, return_lse):
    """Call flex_attention, asking for the lse the way this torch version prefers."""
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # torch < 2.9
        AuxRequest = None
    with warnings.catch_warnings():  # eager flex on CPU warns that it is unfused: known, chosen
        warnings.simplefilter("ignore", UserWarning)
        if not return_lse:
            return fn(q, k, v, block_mask=block_mask, scale=scale), None
        if AuxRequest is None:
            out, lse = fn(q, k, v, block_mask=block_mask, scale=scale, return_lse=True)
        else:
            out, aux = fn(q, k, v, block_mask=block_mask, scale=scale, return_aux=AuxRequest(lse=True))
            lse = aux.lse
    return out, lse.float()


def flex_attention(q, k, v, layout, scale, return_lse):
    """Attention over ``layout``'s blocks (``None``: every key) with FlexAttention: ``(out, lse)``,
    lse (B, H, Sq) float32 or None unless ``return_lse``."""
    compiled = q.device.type == "cuda" or not return_lse  # compiled flex on CPU has no lse
    fn = _compiled() if compiled else flex_function()
    block_mask = None if layout is None else layout.to_block_mask()  # built once per layout
    return _call(fn, q, k, v, block_mask, scale, return_lse)
