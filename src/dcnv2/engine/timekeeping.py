"""Fitting a training run into a wall-clock budget on a machine whose speed changes while it runs.

One speed probe before training is not enough on a shared machine: a probe taken during a neighbour's
burst plans too few iterations and leaves minutes unused, a probe on a quiet machine followed by a busy
spell overruns. :class:`IterationPlanner` re-plans after every iteration from the recent step times, so
the run ends at its deadline whichever way the speed moves; the training loop defines its learning-rate
schedule on the planned length (:meth:`dcnv2.engine.config.TrainConfig.lr_factor` with ``total``), so a
re-planned schedule keeps its warm-up, decay points and cosine at the same fraction of the run.
"""
from __future__ import annotations

import math
import time
from collections import deque
from typing import Callable, Deque, Optional

__all__ = ["IterationPlanner", "now"]


def now() -> float:
    """The planner's default clock (seconds, monotonic); a module function so tests can replace it."""
    return time.perf_counter()


class IterationPlanner:
    """How many iterations fit before a deadline, re-estimated as steps complete.

    Args:
        budget_s: seconds from now (construction) to the deadline (> 0).
        planned: the first estimate of the run's length in iterations (e.g. from a speed probe).
        start: iterations already done (a resumed run).
        min_iters: never plan fewer than this many iterations in total (a run always makes progress).
        window: the speed estimate is the mean of the last ``window`` step times (a mean, not a median:
            the time left is spent on bursts too).
        clock: seconds as a float (default: :func:`now`, looked up at every call).
        tail: seconds to keep free before the deadline for work after the run (an evaluation), as a
            function of the current seconds per iteration - work that slows down with the machine.
        cap: never plan more than this many iterations in total: the budget is then only a safety net
            that shortens a fixed schedule on a machine too slow for it, and never lengthens it.

    Attributes:
        planned: the first estimate (kept for the "planned N, ran M" report).
        total: the current plan.
    """

    def __init__(self, budget_s: float, planned: int, *, start: int = 0, min_iters: int = 1, window: int = 20,
                 clock: Optional[Callable[[], float]] = None,
                 tail: Optional[Callable[[float], float]] = None, cap: Optional[int] = None):
        if not (isinstance(budget_s, (int, float)) and math.isfinite(budget_s) and budget_s > 0):
            raise ValueError(f"IterationPlanner: budget_s must be a positive number of seconds, got {budget_s!r}")
        if not (isinstance(planned, int) and planned >= 1):
            raise ValueError(f"IterationPlanner: planned must be an int >= 1, got {planned!r}")
        if not (isinstance(window, int) and window >= 1):
            raise ValueError(f"IterationPlanner: window must be an int >= 1, got {window!r}")
        if cap is not None and not (isinstance(cap, int) and cap >= 1):
            raise ValueError(f"IterationPlanner: cap must be None or an int >= 1, got {cap!r}")
        self._clock = clock or (lambda: now())
        self.cap = cap
        self._tail = tail
        self.deadline = self._clock() + float(budget_s)
        self.planned = planned
        self.total = max(planned if cap is None else min(planned, cap), min_iters)
        self.min_iters = min_iters
        self._steps: Deque[float] = deque(maxlen=window)
        self._first: Optional[float] = None  # the run's first step: allocations, lazy initialisation
        self._last = self.deadline - float(budget_s)

    def seconds_per_iteration(self) -> Optional[float]:
        """Mean of the recent step times; the first step of the run only until another one is timed."""
        if self._steps:
            return sum(self._steps) / len(self._steps)
        return self._first

    def step_done(self, iteration: int) -> int:
        """Records a finished step; ``iteration`` = iterations completed so far. Returns the new plan
        (``iteration`` itself when no further step fits before the deadline).

        A step's time is the time since the previous call (or construction): data loading, logging and
        checkpoints included, since they spend the budget too."""
        now = self._clock()
        duration, self._last = now - self._last, now
        if self._first is None:
            self._first = duration
        else:
            self._steps.append(duration)
        sec = self.seconds_per_iteration()
        if sec is None:
            return self.total
        left = self.deadline - now - (self._tail(sec) if self._tail is not None else 0.0)
        if left <= 0:
            fit = 0
        elif sec <= 0:  # a clock too coarse to see a step: keep the plan
            fit = self.total - iteration
        else:
            fit = int(left // sec)
        total = iteration + fit if self.cap is None else min(iteration + fit, self.cap)
        self.total = max(total, self.min_iters)
        return self.total

    def left_s(self) -> float:
        """Seconds to the deadline (negative past it)."""
        return self.deadline - self._clock()
