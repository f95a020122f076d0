"""Which requests run: a waiting queue admitted into a running batch of bounded size."""

from __future__ import annotations

from xtuner_lite.errors import UsageError
from xtuner_lite.inference.request import Request


class Scheduler:
    """First come, first admitted, up to ``max_batch_size`` running requests. Running
    requests are in batch-row order: row ``i`` of the model runner is ``running[i]``."""

    def __init__(self, max_batch_size: int = 32):
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise UsageError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        self.max_batch_size = max_batch_size
        self.waiting: list[Request] = []
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def cancel(self, request: Request) -> None:
        """A waiting request leaves at once; a running one when the next step retires it."""
        if request in self.waiting:
            self.waiting.remove(request)
        request.finish_reason = request.finish_reason or "cancelled"

    def admit(self) -> list[Request]:
        """The waiting requests that fit into the batch now; they join ``running`` at its end."""
        admitted = self.waiting[: max(self.max_batch_size - len(self.running), 0)]
        self.waiting = self.waiting[len(admitted) :]
        self.running = self.running + admitted
        return admitted

    def retire(self) -> tuple[list[Request], list[int] | None]:
        """Remove finished requests from the batch: (them, the rows kept; None if none left)."""
        done = [r for r in self.running if r.finished]
        if not done:
            return [], list(range(len(self.running)))
        keep = [i for i, r in enumerate(self.running) if not r.finished]
        self.running = [self.running[i] for i in keep]
        return done, keep or None

    def clear(self) -> list[Request]:
        """Every request, running or waiting, out of the scheduler."""
        ended = self.running + self.waiting
        self.running, self.waiting = [], []
        return ended

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)


__all__ = ["Scheduler"]
