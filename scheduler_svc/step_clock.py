"""When to send the next step: just before the worker needs it, not as soon as it could go.

Two steps are in flight to a worker: while it computes step N+1, step N+2 waits in its inbox, so
the worker never idles between steps. Sent the moment N's result came back, N+2 was decided
before anything that arrives during N+1: a request arriving then waits for the rest of N+1, all
of N+2 and its own step, one whole step longer than it must (on this project's 2-core CPU bench
at 16 req/s, TTFT p50 75 -> 51 ms once held; docs/BENCHMARKS.md). So N+2 is decided and sent
``lead_s`` before N+1 is expected to end, and the worker still finds it waiting.

N+1's duration is predicted from the worker's own ``compute_ms`` of recent steps, fitted by least
squares to what costs time in a step (its rows, its tokens, the context its attention reads),
capped at the longest recent step and shaded down, so that a wrong guess sends early, as
before, rather than late. A late guess costs little anyway: the engine reads N+1's result while
it waits, and decides N+2 at once if the result comes first (the worker idles only while N+2 is
decided and sent, as with one step in flight). An early one costs little more since requests
that arrive after N+2 was sent join it while the worker has not begun it (``step_loop``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from scheduler_svc.batch import ScheduledBatch

WINDOW = 64  # recent steps the fit is made over
MIN_SAMPLES = 8  # fewer observed steps: no prediction (send at once)
SHADE = 0.85  # predicted durations are shaded down: a wrong guess errs early
REFIT_EVERY = 8  # steps observed between fits (a fit per step was 5-8 % of the scheduler's CPU)


def step_features(batch: ScheduledBatch) -> tuple[float, float, float, float]:
    """What a step's time grows with: 1, its rows (sequences), its tokens, and the positions its
    attention reads (thousands)."""
    tokens = batch.num_tokens
    context = sum(batch.decode_positions) + sum(s.start + s.num_tokens for s in batch.seqs)
    return 1.0, float(batch.num_seqs), float(tokens), context / 1000.0


@dataclass
class StepClock:
    """One worker's recent step times, and the send time of the next step they imply."""

    lead_s: float = 0.003  # < 0: send every step as soon as it may go (no waiting)
    _features: deque[tuple[float, ...]] = field(default_factory=lambda: deque(maxlen=WINDOW))
    _ms: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    _coef: np.ndarray | None = None
    _unfitted: int = 0  # observed since the last fit

    def observe(self, batch: ScheduledBatch, compute_ms: float) -> None:
        """A finished step and the worker's time for it (0: not reported, ignored)."""
        if compute_ms <= 0 or self.lead_s < 0:
            return
        self._features.append(step_features(batch))
        self._ms.append(compute_ms)
        self._unfitted += 1

    def predict_ms(self, batch: ScheduledBatch) -> float | None:
        """The worker's time for ``batch``, shaded down; None before enough steps were seen."""
        if len(self._ms) < MIN_SAMPLES:
            return None
        if self._coef is None or self._unfitted >= REFIT_EVERY:
            x, y = np.asarray(self._features), np.asarray(self._ms)
            self._coef = np.linalg.lstsq(x, y, rcond=None)[0]
            self._unfitted = 0
        ms = float(np.dot(self._coef, step_features(batch)))
        if ms <= 0:
            return None
        # Never longer than the longest step seen: a step unlike the recent ones (new requests'
        # prefill among decodes) is extrapolated, and an overlong guess would hold the next step
        # past the worker's need.
        return SHADE * min(ms, max(self._ms))

    def delay_s(self, running: ScheduledBatch, started: float, now: float) -> float:
        """How long to hold the next step, given that ``running`` started on the worker at
        ``started``: until ``lead_s`` before its predicted end (0: send now)."""
        if self.lead_s < 0:
            return 0.0
        ms = self.predict_ms(running)
        if ms is None:
            return 0.0
        return max(0.0, started + ms / 1e3 - self.lead_s - now)
