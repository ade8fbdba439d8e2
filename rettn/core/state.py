"""Per-layer state of the engine: a layer's slot, its cache entries, and what the integration
knows about one attention call."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rettn.core.config import RESIDUAL_DTYPES
from rettn.errors import MemoryBudgetError, NumericalError
from rettn.ops.layout import BlockSparseLayout


def statistics_bytes(shape, residual_dtype: torch.dtype | None, use_rho: bool = True) -> int:
    """Bytes one call of attention ``shape`` (B, H, S, D) caches: rho (float32 per row) when
    ``use_rho``, R in ``residual_dtype`` (None: no R), and R's float32 scale per row in fp8."""
    b, h, s, d = shape
    rows = b * h * s
    n = rows * 4 if use_rho else 0
    if residual_dtype is not None:
        n += rows * d * residual_dtype.itemsize
        if residual_dtype == torch.float8_e4m3fn:
            n += rows * 4
    return n


def format_bytes(n: float) -> str:
    """2.00 GiB, 12.0 MiB, 900 bytes."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} bytes"


def budget_error(need: int, budget: int, n_layers: int, branches: int, shape) -> MemoryBudgetError:
    """The error for statistics of ``need`` bytes over ``max_cache_bytes=budget``."""
    return MemoryBudgetError(
        f"rettn would cache {format_bytes(need)} of Re-ttention statistics (rho + R for "
        f"{n_layers} layers x {branches} CFG branch(es), attention "
        f"{tuple(shape)}), over max_cache_bytes={format_bytes(budget)}. Options: "
        "residual_dtype='float16' or 'bfloat16', residual_device='cpu' (offload), "
        "skip_layers=[...] (fewer cached layers), use_residual=False, or a larger budget."
    )


def residual_form(config, override: str | None) -> str | None:
    """A layer's R dtype name (None: the attention's dtype), or "none" for no R: its
    ``layer_residual`` entry ``override``, else what the config says."""
    if override is not None:
        return override
    return config.residual_dtype if config.use_residual else "none"


def entry_bytes(config, q, override: str | None = None) -> int:
    """Bytes one call like ``q`` caches for a layer whose ``layer_residual`` entry is ``override``."""
    form = residual_form(config, override)
    dtype = None if form == "none" else RESIDUAL_DTYPES.get(form, q.dtype)
    return statistics_bytes(q.shape, dtype, config.use_rho)


def check_budget(config, layer_forms, q, n_layers: int, branches: int):
    """Raise :func:`budget_error` when the statistics of ``n_layers`` layers (``layer_forms``: R
    form -> layer count) for ``branches`` CFG branches of attention like ``q`` exceed
    ``config.max_cache_bytes``. Shapes and config only: no sync."""
    budget = config.max_cache_bytes
    if budget is None:
        return
    need = sum(n * entry_bytes(config, q, form) for form, n in layer_forms.items())
    if need * branches > budget:
        raise budget_error(need * branches, budget, n_layers, branches, q.shape)


@dataclass
class CacheEntry:
    """Statistics of one (layer, branch) from its last cache step."""

    layout: BlockSparseLayout
    density: torch.Tensor  # 0-d: counted density of the layout (a tensor: no device sync per call)
    rho: torch.Tensor | None  # (B, H, Sq) float32; advanced by the ramp after each sparse step
    residual: torch.Tensor | None  # (B, H, Sq, D)
    shape: tuple
    finite: torch.Tensor | None = None  # 0-d bool from the cache step's kernel: O_dense all finite
    residual_scale: torch.Tensor | None = None  # (B, H, Sq, 1) float32 when R is stored in fp8

    @property
    def nbytes(self) -> int:
        parts = (self.rho, self.residual, self.residual_scale)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


class LayerSlot:
    """One attention module's state: its cache entries by (CFG branch, batch row), and what its
    calls did.

    The integration gives each wrapped processor its slot, so an attention call reaches its
    statistics through an object rather than by its layer number: under torch.compile a layer
    number read in the traced code is a constant guarded on, and every block compiled separately
    (diffusers' regional compilation) would recompile once per layer.

    ``id`` numbers the slots of a handle (the keys of :attr:`Engine.cache`); ``layer`` is the
    index among its model's self-attention layers (what ``skip_layers`` refers to); ``model``
    which patched transformer it belongs to (0, or 1 for a pipeline's ``transformer_2``).
    """

    def __init__(self, layer: int, skip: bool, id: int | None = None, model: int = 0, name: str = ""):
        self.layer, self.skip = layer, skip
        self.id = layer if id is None else id
        self.model, self.name = model, name
        self.residual: str | None = None  # RettnConfig.layer_residual's form for this layer, if any
        self.entries: dict[tuple, CacheEntry] = {}
        # this forward's calls: (0-d density tensor, finite flag) for calls that ran sparse, a
        # reason string for calls that ran dense
        self.pending: list = []
        self.calls = 0  # every call of this module, folded from pending by Engine.flush
        self.sparse = 0
        self.dense: dict[str, int] = {}  # reason -> count
        self.token = None  # 0-d int64 CPU tensor: how rettn::attend finds this slot (set by the engine)

    def __repr__(self):
        return (f"LayerSlot(id={self.id}, layer={self.layer}, model={self.model}, skip={self.skip}, "
                f"entries={list(self.entries)})")


@dataclass
class CallInfo:
    """What the integration knows about one attention call."""

    layer: int | None = None  # index among the sparse-eligible layers (or give ``slot``)
    kind: str = "self"  # "self" or "cross"
    dense_spans: list = field(default_factory=list)
    grid: tuple | None = None
    text_first: int = 0  # tokens before the video range (frame_window's video_start)
    row: int | None = None  # batch row when a key-padding mask split the batch
    slot: LayerSlot | None = None  # the layer's state (the integration passes it)
    key_spans: list = field(default_factory=list)  # key ranges kept dense when queries are a part of the keys
    call: int = 0  # which attention call of the processor call this is (Mochi: one per sample)
    # the model's own dense attention when it is not torch's SDPA (a diffusers backend name the
    # engine's dense_hook runs); None: rettn's dense chooser
    dense_with: str | None = None


def not_finite_error(layers, step: int, kind: str, branch) -> NumericalError:
    """The error of a transformer call whose attention output held NaN or inf (Engine.flush)."""
    return NumericalError(
        f"rettn: the attention output of layer(s) {layers} at step {step} ({kind} step, CFG "
        f"branch {branch}) holds NaN or inf. Usual causes: the model's activations "
        "overflowed before attention (fp16: run in bfloat16 or float32; dense attention is NaN there "
        "too), NaN/inf in the inputs (latents, embeddings), or residual_dtype='float16' with "
        "attention outputs beyond 65504 (use 'bfloat16'). check_finite=False turns this check off."
    )
