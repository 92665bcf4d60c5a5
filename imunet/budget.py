"""A training time budget (``imunet-train --minutes``): the run's step count is set from the speed of
its first steps and set again every :data:`RECHECK_STEPS` steps from the speed of the latest ones, so
that a run slowed (or sped up) by other work on the machine still ends inside its budget, and the
learning-rate schedule, which decays over the step count, still ends where training ends."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import replace

from .config import RunConfig

WARMUP_STEPS, CALIBRATION_STEPS = 10, 40
RESERVE = 0.05  # of the budget, kept for validation and checkpoints
RECHECK_STEPS = 50  # steps between re-settings (a fixed count: every process of a run re-sets at the same step)
RATE_WINDOW = 4  # re-settings the speed is measured over (the latest 200 steps)


def budget_steps(cfg: RunConfig, done: int, rate: float, elapsed: float, most: int | None = None) -> RunConfig:
    """``cfg`` with ``steps`` set so that training ends within ``cfg.train.minutes``, at ``rate``
    steps per second, ``elapsed`` seconds and ``done`` steps into the run; never more than ``most``
    (default: the configured steps), never fewer than one more."""
    left = cfg.train.minutes * 60 * (1 - RESERVE) - elapsed
    most = cfg.train.steps if most is None else most
    steps = max(done + 1, min(most, done + int(rate * left)))
    return replace(cfg, train=replace(cfg.train, steps=steps))


class TimeBudget:
    """Calibrates after :data:`CALIBRATION_STEPS` steps (the first :data:`WARMUP_STEPS` not timed),
    or, on one process, as soon as a tenth of the budget has passed (slow steps); then re-sets the
    step count every :data:`RECHECK_STEPS` steps from the speed over the latest
    ``RATE_WINDOW * RECHECK_STEPS`` steps."""

    def __init__(self, minutes: float, first_step: int, single_process: bool) -> None:
        self.minutes, self.first, self.single = minutes, first_step, single_process
        self.t_start = time.perf_counter()
        self.t_warm: float | None = None
        self.marks: deque[tuple[int, float]] = deque(maxlen=RATE_WINDOW + 1)  # (step, time) at re-settings
        self.off = minutes <= 0
        self.most: int | None = None  # the configured steps: a re-setting may go back up to them

    def after_step(self, cfg: RunConfig, step: int) -> RunConfig | None:
        """The configuration with its step count set anew when this step is a calibration or a
        re-setting (on every process of a run at the same step), else None."""
        if self.off:
            return None
        if self.most is None:
            self.most = cfg.train.steps
        now = time.perf_counter()
        if self.marks:
            if (step - self.marks[-1][0]) % RECHECK_STEPS:
                return None
            self.marks.append((step, now))
            (s0, t0), (s1, t1) = self.marks[0], self.marks[-1]
            return budget_steps(cfg, step, (s1 - s0) / max(t1 - t0, 1e-9), now - self.t_start, self.most)
        timed = step - self.first - WARMUP_STEPS
        if timed == 0:
            self.t_warm = now
        slow = self.single and timed >= 3 and now - self.t_start > self.minutes * 6
        if self.t_warm is None or not (timed == CALIBRATION_STEPS - WARMUP_STEPS or slow):
            return None
        self.marks.append((step, now))
        return budget_steps(cfg, step, timed / (now - self.t_warm), now - self.t_start)
