"""The engine worker: the one thread that touches the inference engine; HTTP threads hand it
jobs and cancellations through a queue and read each job's events from the job's own queue."""

from __future__ import annotations

import queue
import threading

from xtuner_lite.errors import XtunerError
from xtuner_lite.inference import InferenceEngine
from xtuner_lite.inference.chat_model import TextStream
from xtuner_lite.server.protocol import Job


class EngineWorker:
    """The only thread that touches the engine; HTTP threads talk to it through queues."""

    def __init__(self, engine: InferenceEngine):
        self.engine = engine
        self.commands: queue.Queue = queue.Queue()
        self.jobs: dict[int, tuple[Job, TextStream]] = {}  # engine request id → job
        self.stats = {"finished": 0, "cancelled": 0, "failed": 0, "peak_batch": 0}
        self.fatal: str | None = None  # why the engine thread stopped, if it ever does
        self._publish_load()
        self.thread = threading.Thread(target=self._run, name="xtuner-engine", daemon=True)
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and self.fatal is None

    def submit(self, job: Job) -> Job:
        self.commands.put(("add", job))
        return job

    def cancel(self, job: Job) -> None:
        self.commands.put(("cancel", job))

    def load(self) -> dict[str, int]:
        """Queue lengths after the engine's last step, requests finished and cancelled so far,
        the largest batch (a snapshot the engine thread publishes: its lists change mid-step)."""
        return dict(self._load)

    def _publish_load(self) -> None:
        self._load = {
            "running": len(self.engine.running),
            "waiting": len(self.engine.waiting),
            **self.stats,
        }

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - never die silently: /health says so
            self.fatal = f"{type(exc).__name__}: {exc}"
            for job, _ in self.jobs.values():
                job.events.put(("error", 500, f"the engine stopped: {self.fatal}"))
            raise

    def _loop(self) -> None:
        while True:
            block = not self.engine.has_work
            try:
                while True:
                    self._handle(*self.commands.get(block=block))
                    block = False
            except queue.Empty:
                pass
            self._publish_load()
            if self.engine.has_work:
                try:
                    finished = self.engine.step()
                except Exception as exc:  # noqa: BLE001 - a step that fails as a whole: its
                    # requests get a 500, the engine starts again from an empty batch
                    finished = self.engine.fail_all(f"internal error: {type(exc).__name__}: {exc}")
                self.stats["peak_batch"] = max(
                    self.stats["peak_batch"], len(self.engine.running) + len(finished)
                )
                for request in finished:
                    self._finish(request)
                self._publish_load()

    def _finish(self, request) -> None:
        kind = {"cancelled": "cancelled", "error": "failed"}.get(request.finish_reason, "finished")
        self.stats[kind] += 1
        job, stream = self.jobs.pop(request.id)
        job.completion_tokens = len(request.output_ids)
        job.cached_tokens = request.cached_tokens
        if request.finish_reason == "error":
            job.events.put(("error", 500, request.error))
            return
        if rest := stream.delta(request, final=True):
            job.events.put(("text", rest))
        job.events.put(("done", request.finish_reason, self.engine.decode(request)))

    def _handle(self, command: str, job: Job) -> None:
        if command == "cancel":
            request = job.request
            if request is not None and not request.finished:
                self.engine.cancel(request)
                if request not in self.engine.running:  # was waiting: it never reaches step()
                    self.jobs.pop(request.id, None)
                    self.stats["cancelled"] += 1
                    job.events.put(("done", "cancelled", ""))
            return
        stream = TextStream(self.engine, job.tools.hold if job.tools else None)

        def on_token(request, _token: int) -> None:
            if text := stream.delta(request):
                job.events.put(("text", text))

        try:
            job.request = self.engine.add_request(
                job.prompt_ids,
                job.params,
                on_token=on_token,
                grammar=job.grammar,
                images=job.images,
            )
        except XtunerError as exc:
            job.events.put(("error", 400, str(exc)))
            return
        except Exception as exc:  # noqa: BLE001 - this request fails alone
            job.events.put(("error", 500, f"internal error: {type(exc).__name__}: {exc}"))
            return
        self.jobs[job.request.id] = (job, stream)
