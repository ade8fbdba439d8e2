"""Does rettn pay here? What ``rettn generate --compare`` says in one line after its speedup:
the share of a dense step that attention takes in the run itself (step clocks and the engine's
attention region, as ``rettn profile`` measures them), and from which sequence length a sparse
step's attention is faster than dense attention on this device (the public ops timed at the
run's heads, head dim, dtype, keep and block size over a few lengths, stopping at the first
that pays or after a few seconds)."""

from __future__ import annotations

import time

import torch

from rettn.ops import selection
from rettn.ops.attention import dense_attention, sparse_step_attention
from rettn.tools.profile.clocks import StepClock, StepRegionTimer, sync
from rettn.tools.profile.runners import Capture

LENGTHS = (1024, 2048, 4096, 8192, 16384)
BUDGET_S = 4.0  # no longer length is started once the measurement has taken this long


class RunClocks:
    """Step clocks, the engine's regions and the attention shape of one rettn run: create it
    before rettn is applied (its forward hook then times rettn's work too), :meth:`watch` the
    handle's engine, run, then read :meth:`attention_share` and :attr:`capture`."""

    def __init__(self, model, device: torch.device):
        self.timer, self.capture = StepRegionTimer(), Capture()
        self.clock = StepClock(model, device, self.timer)

    def watch(self, engine):
        engine.observe(self.timer)
        engine.observe(self.capture)

    def remove(self):
        self.clock.remove()

    def attention_share(self, kinds: list) -> tuple[float, str] | None:
        """(share of attention in the run's dense steps, "dense"), or over all its steps when it
        had none (``kinds``: the step kinds from ``handle.stats()``); None without steps."""
        steps, regions = self.clock.steps(), self.timer.per_step()
        dense = [s for s in steps if s < len(kinds) and kinds[s] == "dense"]
        chosen, label = (dense, "dense") if dense else (list(steps), "rettn")
        total = sum(steps[s][0] for s in chosen)
        if not total:
            return None
        return sum(regions.get(s, {}).get("attention", 0.0) for s in chosen) / total, label


def _time(fn, device: torch.device, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def pays_from(heads: int, head_dim: int, dtype, device: torch.device, keep: float, block_size: int,
              backend=None, lengths=LENGTHS, budget_s: float = BUDGET_S) -> tuple[int | None, int, list]:
    """(the first length where a sparse step's attention call beats the dense call, or None; the
    longest length measured; [(length, dense s, sparse s)]). One batch row, random inputs, a top-k
    layout at ``keep`` and ``block_size``, rho and R as a sparse step has them."""
    t0, rows = time.perf_counter(), []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for n in lengths:
        if rows and time.perf_counter() - t0 > budget_s:
            break
        q, k, v = (torch.randn(1, heads, n, head_dim, generator=gen).to(device, dtype) for _ in range(3))
        layout = selection.topk(q, k, keep, block_q=block_size)
        rho = torch.ones(1, heads, n, device=device)
        residual = torch.zeros_like(q)
        dense = lambda: dense_attention(q, k, v)  # noqa: E731
        sparse = lambda: sparse_step_attention(q, k, v, layout, rho, residual, ramp=0.04,  # noqa: E731
                                               check_finite=True, backend=backend)
        if device.type == "cuda" or not rows:  # the first call of a shape: kernel choice, compilation
            dense(), sparse()
        repeats = 2 if n <= 2048 else 1
        d, s = _time(dense, device, repeats), _time(sparse, device, repeats)
        rows.append((n, d, s))
        if s < d:
            return n, n, rows
    return None, rows[-1][0] if rows else 0, rows


def _k(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else f"{n:,}"


def line(share, tokens: int, first: int | None, rows: list, device: torch.device, keep: float) -> str:
    """The one line ``rettn generate --compare`` prints (``rows`` from :func:`pays_from`)."""
    where = "this GPU" if device.type == "cuda" else "this CPU"
    text = "rettn here: "
    if share is not None:
        text += f"attention is {share[0]:.0%} of a {share[1]} step at {tokens:,} tokens; "
    slower = [n for n, d, s in rows if s >= d]
    span = f"{_k(slower[0])}-{_k(slower[-1])}" if len(slower) > 1 else (_k(slower[0]) if slower else "")
    text += f"on {where} a sparse step's attention (keep {keep:g}) "
    if first is None:
        return text + f"was slower than dense at every length measured ({span} tokens), so sparsity does not pay here"
    text += f"first beats dense at {_k(first)} tokens" + (f" (slower at {span})" if slower else "")
    if tokens < first:
        return text + f", so sparsity does not pay at this run's {tokens:,} tokens"
    return text + f", so sparse attention pays at this run's {tokens:,} tokens"
