"""A training time budget (``imunet-train --minutes``): the run's step count is set once from the
speed of its first steps, so that the learning-rate schedule still ends where training ends."""

from __future__ import annotations

import time
from dataclasses import replace

from .config import RunConfig

WARMUP_STEPS, CALIBRATION_STEPS = 10, 40
RESERVE = 0.05  # of the budget, kept for validation and checkpoints


def budget_steps(cfg: RunConfig, done: int, rate: float, elapsed: float) -> RunConfig:
    """``cfg`` with ``steps`` set so that training ends within ``cfg.train.minutes``, at ``rate``
    steps per second, ``elapsed`` seconds and ``done`` steps into the run; never more than the
    configured steps, never fewer than one more."""
    left = cfg.train.minutes * 60 * (1 - RESERVE) - elapsed
    steps = max(done + 1, min(cfg.train.steps, done + int(rate * left)))
    return replace(cfg, train=replace(cfg.train, steps=steps))


class TimeBudget:
    """Calibrates once: after :data:`CALIBRATION_STEPS` steps (the first :data:`WARMUP_STEPS` not
    timed), or, on one process, as soon as a tenth of the budget has passed (slow steps)."""

    def __init__(self, minutes: float, first_step: int, single_process: bool) -> None:
        self.minutes, self.first, self.single = minutes, first_step, single_process
        self.t_start = time.perf_counter()
        self.t_warm: float | None = None
        self.done = minutes <= 0

    def after_step(self, cfg: RunConfig, step: int) -> RunConfig | None:
        """The recalibrated configuration once, else None."""
        if self.done:
            return None
        now, timed = time.perf_counter(), step - self.first - WARMUP_STEPS
        if timed == 0:
            self.t_warm = now
        slow = self.single and timed >= 3 and now - self.t_start > self.minutes * 6
        if self.t_warm is None or not (timed == CALIBRATION_STEPS - WARMUP_STEPS or slow):
            return None
        self.done = True
        return budget_steps(cfg, step, timed / (now - self.t_warm), now - self.t_start)
