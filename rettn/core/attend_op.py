"""One custom op per attention call the engine handles: ``torch.ops.rettn.attend``.

Under ``torch.compile`` the whole per-call decision of :meth:`Engine.decide` (dense, cache or
sparse step; a sparse step without statistics for this call's shape refreshing them; block
selection; which kernel) and the update of the layer's state (layout, rho, R, the calls it
records) run inside this op, on real tensors, where Dynamo neither traces nor guards on them.
The traced code only passes q, k, v, the call's static facts (the same for every layer and
step of a generation) and the layer's *token*: a 0-d int64 CPU tensor each :class:`LayerSlot`
owns. A tensor is a graph input, not a constant: one graph serves every layer (a layer number
read in the traced code would be guarded on and compile one graph per layer), every step kind
and every CFG branch. The op reads the token's value (a CPU tensor: no device sync) and finds
the engine and slot in a registry.

Side effects: the op is declared with ``mutates_args=()`` although it updates Python state (the
slot's cache entries and call records). That is sound for inference: its output is always used
(the attention output), so it is never removed as dead code, and the calls of one layer after
another are ordered by their data dependencies (each layer's input is the previous one's
output). Autograd is not supported through the op; a call that needs gradients is traced as
plain Python instead (:meth:`Engine.attend`).
"""

from __future__ import annotations

import itertools
import weakref

import torch

from rettn.core.state import CallInfo

_REGISTRY: dict[int, tuple] = {}  # token value -> (weakref to the engine, weakref to the slot)
_NEXT = itertools.count()


def new_token(engine, slot) -> torch.Tensor:
    """A token for ``slot`` of ``engine``: the graph input the op finds them by."""
    n = next(_NEXT)
    _REGISTRY[n] = (weakref.ref(engine), weakref.ref(slot))
    weakref.finalize(slot, _REGISTRY.pop, n, None)
    return torch.tensor(n, dtype=torch.int64)


def _flat(spans) -> list[int]:
    return [int(x) for span in spans for x in span]


def _pairs(flat) -> list[tuple[int, int]]:
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def call(slot, q, k, v, scale, info: CallInfo, mask=None):
    """``torch.ops.rettn.attend`` for this call (what :meth:`Engine.attend` traces)."""
    return torch.ops.rettn.attend(
        q, k, v, mask, slot.token, float(scale), info.kind, _flat(info.dense_spans), _flat(info.key_spans),
        [] if info.grid is None else [int(x) for x in info.grid], int(info.text_first),
        -1 if info.row is None else int(info.row), int(info.call), info.dense_with or "")


@torch.library.custom_op("rettn::attend", mutates_args=())
def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    token: torch.Tensor,
    scale: float,
    kind: str,
    dense_spans: list[int],
    key_spans: list[int],
    grid: list[int],
    text_first: int,
    row: int,
    call: int,
    dense_with: str,
) -> torch.Tensor:
    found = _REGISTRY.get(int(token))
    engine, slot = (None, None) if found is None else (found[0](), found[1]())
    if engine is None or slot is None:
        raise RuntimeError("rettn::attend: this layer's engine is gone (its handle was removed and freed); "
                           "compile the model again after apply_rettention")
    info = CallInfo(layer=slot.layer, kind=kind, dense_spans=_pairs(dense_spans), grid=tuple(grid) or None,
                    text_first=text_first, row=None if row < 0 else row, slot=slot, key_spans=_pairs(key_spans),
                    call=call, dense_with=dense_with or None)
    out = engine.decide(q, k, v, scale, info, slot, mask)
    # the layout the fake promises (empty_like(q): q's strides when q is dense), never an input
    if out is q or out is k or out is v or out.stride() != torch.empty_like(q, device="meta").stride():
        out = torch.empty_like(q).copy_(out)
    return out


@attend.register_fake
def _(q, k, v, mask, token, scale, kind, dense_spans, key_spans, grid, text_first, row, call, dense_with):
    return torch.empty_like(q)
