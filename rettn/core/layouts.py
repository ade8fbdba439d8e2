"""Which key blocks a call keeps: dynamic top-k, or a static window cached per call shape."""

from __future__ import annotations

from rettn.core.config import RettnConfig
from rettn.core.state import CallInfo
from rettn.errors import ConfigError
from rettn.ops import selection
from rettn.ops.layout import BlockSparseLayout


def select_layout(cfg: RettnConfig, static: dict, family: str, q, k, info: CallInfo) -> BlockSparseLayout:
    """The blocks ``cfg`` selects for one call: top-k from pooled q/k (cross-attention and
    non-square calls always), else the ``window`` / ``frame_window`` layout of this shape, built
    once and kept in ``static``; ``family`` names the model in errors."""
    bs = cfg.block_size
    spans = info.dense_spans if cfg.dense_conditioning else []
    if info.kind == "cross" or cfg.pattern == "topk" or q.shape[2] != k.shape[2]:
        square = info.kind == "self" and q.shape[2] == k.shape[2]
        key_spans = info.key_spans if cfg.dense_conditioning else []
        return selection.topk(q, k, cfg.keep, block_q=bs, dense_spans=spans if square else (),
                              dense_key_spans=key_spans)
    seq = q.shape[2]
    key = (cfg.pattern, cfg.keep, seq, tuple(spans), info.grid, info.text_first, q.device)
    layout = static.get(key)
    if layout is None:
        if cfg.pattern == "window":
            layout = selection.window(seq, cfg.keep, bs, dense_spans=spans, device=q.device)
        else:
            if info.grid is None:
                raise ConfigError(
                    f"pattern='frame_window' needs the token grid (frames, height, width), which "
                    f"rettn cannot read for this {family} call; use pattern='topk' or 'window'"
                )
            layout = selection.frame_window(info.grid, cfg.keep, bs, video_start=info.text_first,
                                            seq_len=seq, device=q.device)
        static[key] = layout
    return layout
