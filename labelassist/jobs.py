"""Background jobs: training (and later bulk pre-labels) runs outside the HTTP request.

One worker thread in-process by default. A job has an id, a state (queued, running, finished,
failed), progress reported by the job itself, and a result or an error. Submitting a job whose key
matches a queued or running job returns that job instead of starting a duplicate (a second Train
click while one trains).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

log = logging.getLogger(__name__)

ACTIVE = ("queued", "running")
Progress = Callable[[dict], None]


class JobFailed(Exception):
    """A job failed for a reason worth showing as is (no traceback needed)."""


@dataclass
class Job:
    id: str
    kind: str
    key: str
    state: str = "queued"
    progress: dict = field(default_factory=dict)
    result: dict | None = None
    error: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class JobRunner:
    """A queue served by one daemon thread; keeps the last `keep` jobs for status queries."""

    def __init__(self, keep: int = 200):
        self._jobs: dict[str, Job] = {}
        self._fns: dict[str, Callable[[Progress], dict]] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[str] = queue.Queue()
        self._keep = keep
        self._thread = threading.Thread(target=self._work, name="jobs", daemon=True)
        self._thread.start()

    def submit(self, kind: str, key: str, fn: Callable[[Progress], dict]) -> tuple[Job, bool]:
        """Queue `fn(progress)`; returns (job, created). An active job with the same key is reused."""
        with self._lock:
            for job in self._jobs.values():
                if job.key == key and job.state in ACTIVE:
                    return job, False
            job = Job(id=uuid.uuid4().hex[:12], kind=kind, key=key)
            self._jobs[job.id] = job
            self._fns[job.id] = fn
            self._trim()
        self._queue.put(job.id)
        return job, True

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def counts(self) -> dict[str, int]:
        with self._lock:
            out: dict[str, int] = {}
            for job in self._jobs.values():
                out[job.state] = out.get(job.state, 0) + 1
            return out

    def wait(self, job_id: str, timeout: float) -> Job | None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.get(job_id)
            if job is None or job.state not in ACTIVE:
                return job
            time.sleep(0.05)
        return self.get(job_id)

    def _trim(self) -> None:
        done = [j for j in self._jobs.values() if j.state not in ACTIVE]
        for job in sorted(done, key=lambda j: j.created)[: max(0, len(self._jobs) - self._keep)]:
            del self._jobs[job.id]

    def _work(self) -> None:
        while True:
            job_id = self._queue.get()
            with self._lock:
                job = self._jobs.get(job_id)
                fn = self._fns.pop(job_id, None)
                if job is None or fn is None:
                    continue
                job.state, job.started = "running", time.time()

            def progress(update: dict, job=job) -> None:
                with self._lock:
                    job.progress = {**job.progress, **update}

            try:
                result = fn(progress)
                with self._lock:
                    job.state, job.result = "finished", result or {}
            except JobFailed as exc:
                log.warning("job %s (%s) failed: %s", job.id, job.kind, exc)
                with self._lock:
                    job.state, job.error = "failed", str(exc)
            except Exception as exc:  # anything else: logged with its traceback, shown briefly
                log.exception("job %s (%s) failed", job.id, job.kind)
                with self._lock:
                    job.state, job.error = "failed", f"{type(exc).__name__}: {exc}"
            finally:
                with self._lock:
                    job.finished = time.time()
