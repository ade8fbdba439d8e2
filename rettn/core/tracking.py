"""The denoising step and CFG branch, guessed from the timesteps of a transformer's calls."""

from __future__ import annotations


class StepTracker:
    """Guesses the denoising step and CFG branch from the timesteps of the transformer's calls
    (for bare transformers; with a pipeline the integration reads the pipeline's own signals).

    A call whose timestep is higher than the previous one (or the first call) starts a new
    generation; an equal timestep is another call of the same step (Wan calls cond, then uncond);
    a lower one is the next step. ``rising=True`` is for models whose timestep grows as denoising
    goes on (Z-Image passes ``(1000 - t) / 1000``): the comparisons flip.

    ``rising`` is the model family's convention, which a caller of a bare transformer may not
    follow (a bare Mochi transformer driven with falling timesteps, as every other family takes
    them, read as one new generation per call): the first move of the tracker's first generation
    decides. When it goes against the family's direction, the direction flips (``flipped``) and
    that call is step 1; after that first move, a move back is a new generation as before.
    """

    def __init__(self, rising: bool = False):
        self.expected = rising  # the family's convention (reset() goes back to it)
        self.reset()

    def reset(self):
        self.rising = self.expected
        self.flipped = False
        self.settled = False  # the direction is known: the first generation has made a step
        self.prev_t: float | None = None
        self.first_t: float | None = None
        self.step = -1
        self.branch = 0
        self.generations = 0

    def on_forward(self, t: float) -> bool:
        """Advance on a transformer call with timestep ``t``; True when a new generation starts."""
        if not self.settled and self.prev_t is not None and t != (-self.prev_t if self.rising else self.prev_t):
            self.settled = True  # the first move: it sets the direction
            if (t < -self.prev_t) if self.rising else (t > self.prev_t):  # against the expected one
                self.rising, self.flipped = not self.rising, True
                self.prev_t, self.first_t = -self.prev_t, -self.first_t
        if self.rising:
            t = -t
        new_gen = self.prev_t is None or t > self.prev_t
        if new_gen:
            self.first_t = t
        if new_gen:
            self.generations += 1
            self.step, self.branch = 0, 0
        elif t == self.prev_t:
            self.branch += 1
        else:
            self.step += 1
            self.branch = 0
        self.prev_t = t
        return new_gen

    def progress(self, end: float = 0.0) -> float | None:
        """How far the last call is along the denoising trajectory, from its timestep: 0 at the
        generation's first call, 1 at the timestep ``end`` (where denoising ends: 0 for
        decreasing timesteps; Z-Image's rising ones end at 1). None before any call."""
        if self.prev_t is None:
            return None
        if self.flipped:  # the family's end is on the other side: falling ends at 0, rising at the scale
            end = (1000.0 if abs(self.first_t) > 1 or abs(self.prev_t) > 1 else 1.0) if self.rising else 0.0
        end = -end if self.rising else end
        span = self.first_t - end
        return 0.0 if span <= 0 else min(1.0, max(0.0, (self.first_t - self.prev_t) / span))

    def __repr__(self):
        return f"StepTracker(step={self.step}, branch={self.branch}, generations={self.generations})"


def progress_kind(config, state: dict, step: int, progress: float | None) -> str:
    """The schedule when the number of steps is unknown: fractions (warm-up, refresh interval,
    dense tail) are fractions of the denoising progress read from the timestep; step counts stay
    step counts. ``state`` is the generation's memory (the last cache step), updated here."""
    p = 0.0 if progress is None else progress
    warm, final = config.warmup, config.dense_final
    if (step < warm) if isinstance(warm, int) else (p < warm - 1e-9):
        return "dense"
    if isinstance(final, float) and final > 0 and p >= 1.0 - final - 1e-9:
        return "dense"
    last = state.get("last_cache")
    interval = config.refresh_interval
    due = last is None or (
        step - last[0] >= interval if isinstance(interval, int) else p - last[1] >= interval - 1e-9)
    if due:
        state["last_cache"] = (step, p)
        return "cache"
    return "sparse"
