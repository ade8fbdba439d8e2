"""Does rettn pay here? What ``rettn generate --compare`` says in one line after its speedup:
the share of a dense step that attention takes in the run itself (step clocks and the engine's
attention region, as ``rettn profile`` measures them), and from which sequence length rettn's
attention over the run's schedule (its cache steps: selection, dense pass and statistics; its
sparse steps) costs less than dense attention at those steps on this device. Measured with the
public ops at the run's batch, heads, head dim, dtype, keep and block size, at the run's own
length first, then 2k, 4k, 8k, 16k tokens, stopping at the first that pays or after a few
seconds."""

from __future__ import annotations

import time

import torch

from rettn.ops import selection
from rettn.ops.attention import cache_step_attention, dense_attention, sparse_step_attention
from rettn.tools.profile.clocks import StepClock, StepRegionTimer, sync
from rettn.tools.profile.runners import Capture

LENGTHS = (1024, 2048, 4096, 8192, 16384)
BUDGET_S = 4.0  # seconds: a longer length is not started when it would take the measurement past this


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


    def kind_costs(self, kinds: list) -> dict:
        """{step kind: mean seconds of rettn's work per step of that kind} (attention, selection
        and bookkeeping regions) in the run: what a cache and a sparse step cost against a dense one."""
        regions, out = self.timer.per_step(), {}
        for kind in ("dense", "cache", "sparse"):
            steps = [s for s, k in enumerate(kinds) if k == kind]
            if steps:
                out[kind] = sum(sum(regions.get(s, {}).values()) for s in steps) / len(steps)
        return out


def run_pays(costs: dict, counts: dict) -> bool | None:
    """Did rettn's attention over the run's cache and sparse steps cost less than dense attention
    at those steps would have (None: the run had no dense or no sparse-eligible steps to compare)?"""
    if "dense" not in costs or not counts.get("cache") and not counts.get("sparse"):
        return None
    spent = counts.get("cache", 0) * costs.get("cache", 0.0) + counts.get("sparse", 0) * costs.get("sparse", 0.0)
    return spent < (counts.get("cache", 0) + counts.get("sparse", 0)) * costs["dense"]


def _time(fn, device: torch.device, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def lengths_from(tokens: int, longest: int = LENGTHS[-1]) -> list[int]:
    """The standard lengths above the run's own (which the run itself measured)."""
    return [n for n in LENGTHS if n > tokens and n <= longest]


def pays_from(batch: int, heads: int, head_dim: int, dtype, device: torch.device, keep: float, block_size: int,
              lengths, n_cache: int = 1, n_sparse: int = 1, backend=None,
              budget_s: float = BUDGET_S) -> tuple[int | None, list]:
    """(the first of ``lengths`` at which rettn's attention over the run's non-dense steps,
    ``n_cache`` cache steps (selection + dense pass + statistics) and ``n_sparse`` sparse steps,
    costs less than dense attention at each of those steps, or None; rows ``(length, dense s,
    cache s, sparse s)`` per call). Random inputs, a top-k layout at ``keep`` and ``block_size``."""
    t0, rows = time.perf_counter(), []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for n in lengths:
        # stop when this length would overrun the budget (attention time grows with the square of it)
        if rows and time.perf_counter() - t0 + (n / rows[-1][0]) ** 2 * sum(rows[-1][1:]) > budget_s:
            break
        q, k, v = (torch.randn(batch, heads, n, head_dim, generator=gen).to(device, dtype) for _ in range(3))
        layout = selection.topk(q, k, keep, block_q=block_size)
        rho = torch.ones(batch, heads, n, device=device)
        residual = torch.zeros_like(q)
        calls = {
            "dense": lambda: dense_attention(q, k, v),
            "cache": lambda: cache_step_attention(q, k, v, selection.topk(q, k, keep, block_q=block_size),
                                                  check_finite=True, backend=backend),
            "sparse": lambda: sparse_step_attention(q, k, v, layout, rho, residual, ramp=0.04, check_finite=True,
                                                    backend=backend),
        }
        if device.type == "cuda" or not rows:  # the first call of a shape: kernel choice, compilation
            for fn in calls.values():
                fn()
        repeats = 3 if n <= 2048 else 1
        d, c, s = (_time(calls[name], device, repeats) for name in ("dense", "cache", "sparse"))
        rows.append((n, d, c, s))
        if n_cache * c + n_sparse * s < (n_cache + n_sparse) * d:
            return n, rows
    return None, rows


def short_tokens(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else f"{n:,}"  # 16k; 1,040


def line(share, tokens: int, first: int | None, rows: list, device: torch.device, keep: float,
         counts: dict, density: float | None = None) -> str:
    """The one line ``rettn generate --compare`` prints (``rows`` from :func:`pays_from`,
    ``counts`` the run's step kinds; ``density``: the run's counted density, what the longer
    lengths were timed at, named beside the config's ``keep``)."""
    where = "this GPU" if device.type == "cuda" else "this CPU"
    text = "rettn here: "
    if share is not None:
        text += f"attention is {share[0]:.0%} of a {share[1]} step at {tokens:,} tokens; "
    more = [n for n, *_ in rows if n != first]
    span = "-".join(short_tokens(n) for n in dict.fromkeys([more[0], more[-1]])) if more else ""
    text += (f"on {where} the attention of its {counts.get('cache', 0)} cache + {counts.get('sparse', 0)} sparse "
             f"steps (keep {keep:g}" + (f", counted density {density:.3f}" if density is not None else "") + ") ")
    if first is None:
        return text + f"costs more than dense at every length measured ({span} tokens), so sparsity does not pay here"
    text += f"first costs less than dense at {short_tokens(first)} tokens" + (f" (more at {span})" if more else "")
    if tokens < first:
        return text + f", so sparsity does not pay at this run's {tokens:,} tokens"
    return text + ", so sparse attention pays at this run's length"
