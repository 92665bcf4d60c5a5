"""Training progress: a live bar on a terminal, a line every 5% of the steps otherwise (logs, CI)."""

from __future__ import annotations

import sys
import time
from typing import Callable


class StepProgress:
    """Shows step, loss, speed and time left; ``update`` after every step, ``close`` at the end."""

    def __init__(self, total: int, start: int, say: Callable[[str], None], live: bool | None = None) -> None:
        self.total, self.start, self.say = total, start, say
        self.t0 = time.perf_counter()
        self.every = max(1, total // 20)
        self.bar = None
        if live if live is not None else sys.stdout.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[rate]} steps/s"),
                TimeRemainingColumn(),
            )
            self.bar.start()
            self.task = self.bar.add_task("train", total=total, completed=start, loss="-", rate="-")

    def retarget(self, total: int) -> None:
        """The run's step count changed (a time budget was calibrated)."""
        self.total, self.every = total, max(1, total // 20)
        if self.bar is not None:
            self.bar.update(self.task, total=total)

    def update(self, done: int, loss: float) -> None:
        rate = (done - self.start) / max(time.perf_counter() - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.update(self.task, completed=done, loss=f"{loss:.4f}", rate=f"{rate:.2f}")
        elif done % self.every == 0 or done == self.total:
            left = (self.total - done) / max(rate, 1e-9)
            self.say(f"step {done}/{self.total}  loss {loss:.4f}  {rate:.2f} steps/s  ~{left / 60:.1f} min left")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
