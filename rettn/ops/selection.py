"""Block selection: which key blocks each query block keeps. Every function returns a
:class:`~rettn.ops.layout.BlockSparseLayout`.

- :func:`topk`: dynamic, per (batch, head, query block), from mean-pooled Q and K blocks.
- :func:`topk_mass`: dynamic, keeps blocks until their estimated softmax mass reaches a threshold.
- :func:`window`: the paper's static 1-D band over the token index (images).
- :func:`frame_window`: the paper's static video pattern: a window inside each frame plus the same
  positions in every other frame.
- :func:`add_dense_spans`: rows and columns of conditioning (text) tokens kept dense.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from rettn.errors import InputError, InputTypeError
from rettn.ops._checks import resolve_scale
from rettn.ops.layout import (
    BlockSparseLayout,
    block_sizes,
    ceil_blocks,
    check_positive_int,
    constant,
    dense_to_kv,
    num_blocks,
)

Span = tuple[int, int]


def _check_keep(keep, name: str = "keep") -> float:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise InputError(f"{name} must be a fraction in (0, 1], got {keep!r}")
    return float(keep)


def _check_nonneg_int(name: str, value) -> int:
    """``value`` as an int >= 0: any integer type (numpy's included) but bool."""
    if type(value) is int and value >= 0:  # the usual case
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise InputError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _check_grid(grid) -> tuple[int, int, int]:
    """(frames, height, width): three positive integers, in tokens."""
    values = grid.tolist() if hasattr(grid, "tolist") else grid  # a tensor or a numpy array
    if isinstance(values, (tuple, list)):  # the usual case
        values = tuple(values)
    elif isinstance(values, (str, bytes)):
        values = None
    else:
        try:
            values = tuple(values)
        except TypeError:  # not iterable: a single number
            values = None
    if values is None or len(values) != 3:
        shown = grid if values is None else values
        raise InputError(f"grid must be (frames, height, width) in tokens: three positive integers, got {shown!r}")
    return tuple(check_positive_int(n, v) for n, v in zip(("frames", "height", "width"), values))


def _check_qk(q, k) -> None:
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor):
            raise InputTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise InputError(f"{name} must be a 4-D (batch, heads, seq, head_dim) tensor, got shape {tuple(t.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise InputError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, heads and head_dim"
        )


def _block_sizes_f32(seq: int, block: int, device) -> torch.Tensor:
    """(n, 1) float32 real block sizes, cached per (seq, block, device)."""
    return constant(("selection.sizes", seq, block, device),
                    lambda: block_sizes(seq, block, device).to(torch.float32).unsqueeze(-1))


def pool_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over the real tokens of each block: (B, H, S, D) -> (B, H, n_blocks, D) float32.

    Sums in ``x``'s dtype with float32 accumulation, on views of ``x`` (a strided (B, S, H, D)
    tensor seen as (B, H, S, D) included): the full blocks as one reduction, a short tail block
    as another. No padded or float copy of ``x`` is made (on CUDA; a CPU reduction may convert
    internally), and nothing syncs.
    """
    s = x.shape[2]
    n_full, tail = divmod(s, block)
    parts = []
    if n_full:
        parts.append(x.narrow(2, 0, n_full * block).unflatten(2, (n_full, block)).sum(3, dtype=torch.float32))
    if tail:
        parts.append(x.narrow(2, n_full * block, tail).sum(2, keepdim=True, dtype=torch.float32))
    sums = parts[0] if len(parts) == 1 else torch.cat(parts, 2)
    return sums / _block_sizes_f32(s, block, x.device)


def diagonal_blocks(seq: int, block_q: int, block_k: int, device=None) -> torch.Tensor:
    """For self-attention: the key block holding the middle token of each query block."""
    starts = torch.arange(num_blocks(seq, block_q), device=device) * block_q
    mid = starts + (torch.clamp(seq - starts, max=block_q) - 1) // 2
    return mid // block_k


def _diagonal_mask(seq: int, block_q: int, block_k: int, device) -> torch.Tensor:
    """(nQ, nK) bool, True at each query block's diagonal key block; cached."""
    def build():
        cols = torch.arange(num_blocks(seq, block_k), device=device)
        return cols == diagonal_blocks(seq, block_q, block_k, device).unsqueeze(-1)
    return constant(("selection.diag", seq, block_q, block_k, device), build)


def _block_scores(q, k, block_q, block_k, scale):
    qp, kp = pool_blocks(q, block_q), pool_blocks(k, block_k)
    return torch.matmul(qp, kp.transpose(-1, -2)) * scale  # (B, H, nQ, nK)


def _sorted_layout(indices, block_q, block_k, seq_q, seq_k) -> BlockSparseLayout:
    """Layout from (B, H, nQ, n) distinct block indices with the same count in every row."""
    idx = torch.sort(indices, dim=-1).values.to(torch.int32).contiguous()
    counts = torch.full(idx.shape[:3], idx.shape[3], dtype=torch.int32, device=idx.device)
    return BlockSparseLayout(counts, idx, block_q, block_k, seq_q, seq_k, validate=False)


def _merge(mask, extra, block_q, block_k, seq_q, seq_k) -> BlockSparseLayout:
    """Layout of ``mask | extra`` ((B, H, nQ, nK) and a broadcastable (nQ, nK) bool), full width
    (every key block): a shape that does not depend on the data, so it needs no sync and
    torch.compile traces it once. No row lost a block, so no validation is needed."""
    if extra is not None:
        mask = mask | extra
    counts, indices = dense_to_kv(mask, width=mask.shape[-1])
    return BlockSparseLayout(counts, indices, block_q, block_k, seq_q, seq_k, validate=False)


def topk(q, k, keep: float, block_q: int = 128, block_k: int | None = None, scale=None,
         dense_spans: Sequence[Span] = (), dense_key_spans: Sequence[Span] = ()) -> BlockSparseLayout:
    """Keep the top ``ceil(keep * nK)`` key blocks per (batch, head, query block).

    Blocks are scored by the mean-pooled query block against the mean-pooled key block (times
    ``scale``, default ``D ** -0.5``). In self-attention (``seq_q == seq_k``) the diagonal block
    is always kept. ``dense_spans`` are (start, end) token ranges kept dense (see
    :func:`add_dense_spans`); ``dense_key_spans`` are key ranges every query block attends (see
    :func:`add_dense_key_spans`: for queries over [text, image] keys).

    No device sync, no copy of q or k, no host-to-device copy (per-shape constants are cached
    on the device): the call can be captured in a CUDA graph and traced by torch.compile.
    """
    _check_qk(q, k)
    keep = _check_keep(keep)
    block_q = check_positive_int("block_q", block_q)
    block_k = check_positive_int("block_k", block_q if block_k is None else block_k)
    scale = resolve_scale(scale, q)
    seq_q, seq_k = q.shape[2], k.shape[2]
    if dense_spans and seq_q != seq_k:
        raise InputError("dense spans apply to self-attention layouts (seq_q == seq_k)")
    extra = _extra_mask(seq_q, seq_k, block_q, block_k, dense_spans, dense_key_spans, q.device)
    scores = _block_scores(q, k, block_q, block_k, scale)
    if seq_q == seq_k:
        scores.masked_fill_(_diagonal_mask(seq_q, block_q, block_k, q.device), float("inf"))
    n = ceil_blocks(keep, scores.shape[-1])
    chosen = scores.topk(n, dim=-1).indices
    if extra is None:
        return _sorted_layout(chosen, block_q, block_k, seq_q, seq_k)
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=q.device).scatter_(-1, chosen, True)
    return _merge(mask, extra, block_q, block_k, seq_q, seq_k)


def topk_mass(q, k, mass: float = 0.9, block_q: int = 128, block_k: int | None = None,
              scale=None, max_keep: float = 1.0, dense_spans: Sequence[Span] = ()) -> BlockSparseLayout:
    """Keep key blocks, best first, until their estimated share of the softmax mass reaches ``mass``.

    A block's mass is estimated as ``size * exp(score)`` with the pooled score of :func:`topk`.
    At most ``ceil(max_keep * nK)`` blocks are kept; the diagonal block always is.
    """
    _check_qk(q, k)
    mass = _check_keep(mass, "mass")
    max_keep = _check_keep(max_keep, "max_keep")
    block_q = check_positive_int("block_q", block_q)
    block_k = check_positive_int("block_k", block_q if block_k is None else block_k)
    scale = resolve_scale(scale, q)
    seq_q, seq_k = q.shape[2], k.shape[2]
    if dense_spans and seq_q != seq_k:
        raise InputError("dense spans apply to self-attention layouts (seq_q == seq_k)")
    extra = _extra_mask(seq_q, seq_k, block_q, block_k, dense_spans, (), q.device)
    scores = _block_scores(q, k, block_q, block_k, scale)
    nk = scores.shape[-1]
    log_sizes = constant(("selection.log_sizes", seq_k, block_k, q.device),
                         lambda: block_sizes(seq_k, block_k, q.device).float().log())
    probs, order = torch.softmax(scores + log_sizes, dim=-1).sort(dim=-1, descending=True)
    before = probs.cumsum(-1) - probs  # mass of the better blocks
    cap = ceil_blocks(max_keep, nk)
    rank = torch.arange(nk, device=q.device)
    take = ((before < mass) & (rank < cap)) | (rank == 0)
    mask = torch.zeros_like(take).scatter_(-1, order, take)
    if seq_q == seq_k:
        mask |= _diagonal_mask(seq_q, block_q, block_k, q.device)
    if extra is not None:
        return _merge(mask, extra, block_q, block_k, seq_q, seq_k)
    # at most `cap` blocks by mass, plus the diagonal: a width known without reading the counts
    counts, indices = dense_to_kv(mask, width=min(nk, cap + (seq_q == seq_k)))
    return BlockSparseLayout(counts, indices, block_q, block_k, seq_q, seq_k, validate=False)


def window(seq_len: int, keep: float, block_size: int = 128, dense_spans: Sequence[Span] = (),
           device=None) -> BlockSparseLayout:
    """The paper's image pattern at block granularity: a band of ``ceil(keep * nK)`` key blocks
    centred on each query block's diagonal (shifted inward at the sequence ends so every row keeps
    the same number). Same for every batch row and head (B = H = 1, broadcast).
    """
    seq_len = check_positive_int("seq_len", seq_len)
    keep = _check_keep(keep)
    block_size = check_positive_int("block_size", block_size)
    nk = num_blocks(seq_len, block_size)
    n = ceil_blocks(keep, nk)
    diag = diagonal_blocks(seq_len, block_size, block_size, device)
    start = (diag - (n - 1) // 2).clamp(0, nk - n)
    idx = (start.unsqueeze(-1) + torch.arange(n, device=device)).view(1, 1, -1, n)
    layout = _sorted_layout(idx, block_size, block_size, seq_len, seq_len)
    return add_dense_spans(layout, dense_spans) if dense_spans else layout


def frame_window(grid: Sequence[int], keep: float, block_size: int = 128, video_start: int = 0,
                 seq_len: int | None = None, half_width: int | None = None,
                 device=None) -> BlockSparseLayout:
    """The paper's video (CogVideoX) pattern at block granularity.

    Video tokens are laid out frame by frame (``grid = (frames, height, width)`` in tokens,
    frame-major) starting at ``video_start``. Video token (f, i) keeps keys (f', i') with
    ``|i - i'| <= half_width`` for every frame f' (default ``half_width = round(keep * h * w / 2)``,
    the paper's +-21 at 3.1% on CogVideoX-2B). A key block is kept when any of its tokens is.
    Tokens outside the video range (``seq_len`` defaults to ``video_start + frames*h*w``) are
    conditioning tokens: their rows and columns stay dense.

    Blocks round the pattern up: report ``layout.density()``, not ``keep``.
    """
    grid = frames, height, width = _check_grid(grid)
    keep = _check_keep(keep)
    block_size = check_positive_int("block_size", block_size)
    per_frame = height * width
    n_video = frames * per_frame
    video_start = _check_nonneg_int("video_start", video_start)
    seq_len = video_start + n_video if seq_len is None else check_positive_int("seq_len", seq_len)
    if video_start + n_video > seq_len:
        raise InputError(
            f"grid {tuple(grid)} holds {n_video} video tokens starting at {video_start}, which does "
            f"not fit a sequence of {seq_len} tokens (expected seq_len >= {video_start + n_video})"
        )
    if half_width is None:
        half_width = int(round(keep * per_frame / 2))
    else:
        half_width = _check_nonneg_int("half_width", half_width)

    nb = num_blocks(seq_len, block_size)
    pos = torch.arange(n_video, device=device) % per_frame  # in-frame index of each video token
    rows = (torch.arange(n_video, device=device) + video_start) // block_size
    covered = torch.zeros(nb, per_frame, device=device)
    covered[rows, pos] = 1.0
    # allowed[r, i'] = some query of block r sits within half_width of in-frame position i'.
    allowed = F.max_pool1d(covered.unsqueeze(1), 2 * half_width + 1, stride=1, padding=half_width)
    allowed = allowed.squeeze(1)[:, :per_frame] > 0
    keys = torch.zeros(nb, nb * block_size, dtype=torch.bool, device=device)
    keys[:, video_start : video_start + n_video] = allowed[:, pos]
    mask = keys.view(nb, nb, block_size).any(-1)
    video_blocks = torch.zeros(nb, dtype=torch.bool, device=device)
    video_blocks[rows] = True
    cond = torch.ones(seq_len, dtype=torch.bool, device=device)
    cond[video_start : video_start + n_video] = False
    cond_blocks = F.pad(cond, (0, nb * block_size - seq_len)).view(nb, block_size).any(-1)
    mask[cond_blocks] = True
    mask[:, cond_blocks] = True
    return BlockSparseLayout.from_dense(mask.view(1, 1, nb, nb), block_size, block_size, seq_len, seq_len)


def _check_spans(spans: Sequence[Span], seq: int) -> tuple[Span, ...]:
    """The spans as a tuple of (start, end) Python ints, each inside [0, seq)."""
    checked = []
    for span in spans:
        try:
            start, end = (int(x) for x in span)
        except (TypeError, ValueError):
            raise InputError(f"dense spans must be (start, end) token ranges, got {span!r}") from None
        if not 0 <= start < end <= seq:
            raise InputError(
                f"dense span {(start, end)} must satisfy 0 <= start < end <= {seq} (sequence length)"
            )
        checked.append((start, end))
    return tuple(checked)


def _span_blocks(spans: tuple[Span, ...], seq: int, block: int, device) -> torch.Tensor:
    """(n_blocks,) bool: the blocks overlapping any of the (checked) spans."""
    ids = torch.arange(num_blocks(seq, block), device=device)
    hit = torch.zeros(ids.shape, dtype=torch.bool, device=device)
    for start, end in spans:
        hit |= (ids >= start // block) & (ids <= (end - 1) // block)
    return hit


def _extra_mask(seq_q, seq_k, block_q, block_k, spans, key_spans, device):
    """(nQ, nK) bool of the blocks that ``spans`` (rows and columns) and ``key_spans`` (columns)
    add to every (batch, head); None when both are empty. Cached per shape, spans and device."""
    spans = _check_spans(spans, seq_q) if spans else ()
    key_spans = _check_spans(key_spans, seq_k) if key_spans else ()
    if not spans and not key_spans:
        return None

    def build():
        rows = _span_blocks(spans, seq_q, block_q, device)
        cols = _span_blocks(spans + key_spans, seq_k, block_k, device)
        return rows.unsqueeze(-1) | cols
    return constant(("selection.spans", seq_q, seq_k, block_q, block_k, spans, key_spans, device), build)


def add_dense_spans(layout: BlockSparseLayout, spans: Sequence[Span]) -> BlockSparseLayout:
    """Keep conditioning tokens dense: every query block overlapping a span attends all key
    blocks, and every query block attends the key blocks overlapping a span.

    ``spans`` are (start, end) token ranges of a self-attention sequence: e.g. ``[(0, 226)]`` for
    CogVideoX's text (first), ``[(seq - n_text, seq)]`` for HunyuanVideo (last). The result has
    one column per key block (a static shape; no sync).
    """
    if layout.seq_q != layout.seq_k:
        raise InputError("dense spans apply to self-attention layouts (seq_q == seq_k)")
    if not spans:
        return layout
    extra = _extra_mask(layout.seq_q, layout.seq_k, layout.block_q, layout.block_k, spans, (), layout.device)
    return _merge(layout.to_dense(), extra, layout.block_q, layout.block_k, layout.seq_q, layout.seq_k)


def add_dense_key_spans(layout: BlockSparseLayout, spans: Sequence[Span]) -> BlockSparseLayout:
    """Every query block attends the key blocks overlapping ``spans`` (key token ranges); for
    attention whose queries are image tokens and whose keys are [text, image] (Qwen-Image 2.1,
    PRX, NucleusMoE): the text keys stay dense, the image keys are selected."""
    if not spans:
        return layout
    extra = _extra_mask(layout.seq_q, layout.seq_k, layout.block_q, layout.block_k, (), spans, layout.device)
    return _merge(layout.to_dense(), extra, layout.block_q, layout.block_k, layout.seq_q, layout.seq_k)


__all__ = ["topk", "topk_mass", "window", "frame_window", "add_dense_spans", "add_dense_key_spans",
           "diagonal_blocks"]
