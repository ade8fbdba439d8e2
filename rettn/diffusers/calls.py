"""What the attention processors need to know about the transformer call they are part of: the
family of the model the layer belongs to, the forward's text length and token grid, and the
context-parallel check. The handle fills it before each transformer call; the processors read
it (so they need nothing of the handle's own).
"""

from __future__ import annotations

from rettn.core.engine import CallInfo
from rettn.diffusers import families as fam
from rettn.diffusers.parallel import context_parallel


class CallFacts:
    """The facts of the current transformer call, shared by the handle (which writes
    :attr:`forward_args`) and its processors (which read them through :meth:`call_info`)."""

    def __init__(self, families: list):
        self.families = families  # one Family per patched transformer, by model index
        self.forward_args: dict = {}  # "text_len" and "grid" of the current call

    def family_of(self, slot) -> fam.Family:
        return self.families[slot.model]

    @staticmethod
    def check_parallel(processor):
        """Ring attention is refused (:func:`rettn.diffusers.parallel.context_parallel`)."""
        context_parallel(getattr(processor, "_parallel_config", None))

    def call_info(self, slot, kind: str, seq: int, row=None, padding: int = 0, call: int = 0) -> CallInfo:
        """Dense spans (conditioning tokens), grid and video start for an attention call over
        ``seq`` tokens; ``padding`` tokens were cut from the end of this row's sequence."""
        family = self.family_of(slot)
        grid = self.forward_args.get("grid")
        video = grid[0] * grid[1] * grid[2] if grid is not None else None
        if family.conditioning == "non-grid" and video is not None:
            text = seq - video  # registers, padding, several text encoders: all conditioning
        else:
            text = self.forward_args.get("text_len", 0) - padding
        spans, text_first = [], 0
        if kind == "self" and family.text and 0 < text < seq and seq != video:
            if family.text == "first":
                spans, text_first = [(0, text)], text
            else:
                spans = [(seq - text, seq)]
        if video is not None and video + (text if spans else 0) != seq:
            grid = None  # this call's sequence is not [text +] the video grid
        return CallInfo(kind=kind, dense_spans=spans, grid=grid, text_first=text_first, row=row, slot=slot,
                        call=call)
