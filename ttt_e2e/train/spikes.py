"""What to do with a step whose outer gradient is bad (optim.spike_policy).

The unrolled meta-gradient of a long inner loop occasionally explodes (issue 26: norms of 1e6-1e14 in a few
steps of a small model with 128 inner steps per sequence, then a non-finite one). Clipping rescales such a
gradient to the clip norm but keeps its direction, which is then mostly noise; large-scale trainers instead
drop the update of a step whose gradient norm is non-finite or far above its recent typical value, count it, and
give up only when it keeps happening (a run that diverged for good). That is the "skip" policy here:

- non-finite loss or gradient norm: skip;
- gradient norm > spike_factor x the median of the last spike_window accepted norms (once spike_min_history
  accepted norms are known, so the large norms at initialization are not judged against nothing): skip;
- spike_max_consecutive skips in a row: stop, with the reason.

Skipped norms never enter the history, so a spike cannot raise the bar for the next one. "stop" is the old
behaviour: stop at the first non-finite loss or gradient norm, never skip.
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Optional

from ttt_e2e.config import OptimConfig


class SpikeGuard:
    def __init__(self, cfg: OptimConfig):
        self.cfg = cfg
        self.history: deque[float] = deque(maxlen=cfg.spike_window)
        self.skipped = False  # the last checked step was skipped
        self.total = 0  # skipped steps so far (this process)
        self.in_a_row = 0

    def check(self, loss: float, grad_norm: float) -> Optional[str]:
        """Judge one step. Returns None to go on (see .skipped: update or not), or why the run must stop."""
        if not math.isfinite(loss):
            why = "non-finite loss"
        elif not math.isfinite(grad_norm):
            why = "non-finite gradient norm"
        elif (len(self.history) >= self.cfg.spike_min_history
              and grad_norm > self.cfg.spike_factor * statistics.median(self.history)):
            why = f"gradient norm {grad_norm:.3g} > {self.cfg.spike_factor:g} x median {statistics.median(self.history):.3g}"
        else:
            why = None
        if self.cfg.spike_policy == "stop":
            # Only a non-finite value stops; a large finite norm is left to the clip, as before.
            self.skipped = False
            return why if why is not None and why.startswith("non-finite") else None
        self.skipped = why is not None
        if not self.skipped:
            self.history.append(grad_norm)
            self.in_a_row = 0
            return None
        self.total += 1
        self.in_a_row += 1
        if self.in_a_row >= self.cfg.spike_max_consecutive:
            return f"{why}, {self.in_a_row} skipped steps in a row (optim.spike_max_consecutive)"
        return None
