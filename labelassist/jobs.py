"""Background jobs: training (and later bulk pre-labels) runs outside the HTTP request.

Two runners, one interface (`submit`, `get`, `counts`):
- `JobRunner`: one worker thread in-process (the default);
- `RQJobRunner`: an RQ queue on Redis (REDIS_URL), executed by `labelassist worker` processes on
  any machine that shares the model registry.

A job has an id, a state (queued, running, finished, failed), progress reported by the job itself,
and a result or an error. Submitting a job whose key matches a queued or running job returns that job
instead of starting a duplicate (a second Train click while one trains). A job function is called as
`fn(progress, **kwargs)`; for RQ it must be a module-level function (workers import it by name).
"""
from __future__ import annotations

import functools
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


class _Runner:
    poll = 0.05

    def get(self, job_id: str) -> Job | None:
        raise NotImplementedError

    def wait(self, job_id: str, timeout: float) -> Job | None:
        """The job once it has ended (or as it is after `timeout` seconds); None if unknown."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.get(job_id)
            if job is None or job.state not in ACTIVE:
                return job
            time.sleep(self.poll)
        return self.get(job_id)


class JobRunner(_Runner):
    """A queue served by one daemon thread; keeps the last `keep` jobs for status queries."""

    def __init__(self, keep: int = 200):
        self._jobs: dict[str, Job] = {}
        self._fns: dict[str, Callable[[Progress], dict]] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[str] = queue.Queue()
        self._keep = keep
        self._thread = threading.Thread(target=self._work, name="jobs", daemon=True)
        self._thread.start()

    remote = False

    def submit(self, kind: str, key: str, fn: Callable[..., dict], kwargs: dict | None = None) -> tuple[Job, bool]:
        """Queue `fn(progress, **kwargs)`; returns (job, created). An active job with the same key is reused."""
        if kwargs:
            fn = functools.partial(fn, **kwargs)
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


# --- RQ on Redis ---------------------------------------------------------------------------------
#: A running job refreshes its heartbeat key this often; without one for LOST_AFTER_S it is lost.
HEARTBEAT_S = 2.0
LOST_AFTER_S = 10.0
_RQ_STATES = {"queued": "queued", "deferred": "queued", "scheduled": "queued", "created": "queued",
              "rate_limited": "queued", "started": "running", "finished": "finished"}


def _alive_key(job_id: str) -> str:
    return f"labelassist:alive:{job_id}"


def _active_key(key: str) -> str:
    return f"labelassist:active:{key}"


def _ts(value) -> float | None:
    return value.timestamp() if value is not None else None


class RQJobRunner(_Runner):
    """Jobs on an RQ queue, executed by `labelassist worker` processes.

    Progress lives in the RQ job's meta; the running job keeps a heartbeat key fresh. RQ itself only
    notices a killed worker after minutes, so a running job whose heartbeat is gone for
    LOST_AFTER_S is marked failed here ("worker lost") and its key freed for the next Train click.
    """

    remote = True
    poll = 0.2

    def __init__(self, redis_url: str, queue_name: str = "labelassist", job_timeout: int = 6 * 3600,
                 lost_after: float = LOST_AFTER_S):
        from redis import Redis
        from rq import Queue

        self.connection = Redis.from_url(redis_url)
        self.queue = Queue(queue_name, connection=self.connection, default_timeout=job_timeout)
        self.lost_after = lost_after

    def submit(self, kind: str, key: str, fn: Callable[..., dict], kwargs: dict | None = None) -> tuple[Job, bool]:
        target = f"{fn.__module__}.{fn.__qualname__}"
        if "<" in target or isinstance(fn, functools.partial):
            raise TypeError(f"RQ jobs need a module-level function, not {fn!r}")
        job_id = uuid.uuid4().hex[:12]
        active = _active_key(key)

        def claim(pipe) -> str | None:
            existing = pipe.get(active)
            if existing is not None:
                job = self.get(existing.decode())
                if job is not None and job.state in ACTIVE:
                    return job.id
            pipe.multi()
            pipe.set(active, job_id)
            return None

        running = self.connection.transaction(claim, active, value_from_callable=True)
        if running is not None:
            return self.get(running), False
        self.queue.enqueue(run_rq_job, target, kwargs or {}, key, job_id=job_id, result_ttl=7 * 86400,
                           failure_ttl=7 * 86400, meta={"kind": kind, "key": key, "progress": {}},
                           description=f"{kind} {key}")
        return self.get(job_id), True

    def get(self, job_id: str) -> Job | None:
        from rq.exceptions import NoSuchJobError
        from rq.job import Job as RQJob

        try:
            rq_job = RQJob.fetch(job_id, connection=self.connection)
        except NoSuchJobError:
            return None
        status = rq_job.get_status(refresh=False)
        status = getattr(status, "value", status)
        state = _RQ_STATES.get(str(status), "failed")
        meta = rq_job.meta or {}
        error = meta.get("error")
        if (state == "running" and not self.connection.exists(_alive_key(job_id))
                and time.time() - (_ts(rq_job.started_at) or time.time()) > self.lost_after):
            error = self._mark_lost(rq_job)
            state = "failed"
        result = None
        if state == "finished":
            result = rq_job.return_value()
        elif state == "failed" and not error:
            error = f"job {status} in the worker"
        return Job(id=rq_job.id, kind=meta.get("kind", "job"), key=meta.get("key", ""), state=state,
                   progress=dict(meta.get("progress") or {}), result=result, error=error,
                   created=_ts(rq_job.enqueued_at or rq_job.created_at) or 0.0,
                   started=_ts(rq_job.started_at), finished=_ts(rq_job.ended_at))

    def _mark_lost(self, rq_job) -> str:
        from rq.job_lifecycle import record_job_failure
        from rq.registry import StartedJobRegistry

        error = (f"worker lost: no heartbeat for {self.lost_after:.0f} s (the worker process died or its "
                 f"machine went away); nothing was published")
        rq_job.meta["error"] = error
        rq_job.save_meta()
        with self.connection.pipeline() as pipe:
            StartedJobRegistry(queue=self.queue).remove_executions(rq_job, pipeline=pipe)
            record_job_failure(rq_job, error, pipe)
            pipe.execute()
        key = (rq_job.meta or {}).get("key")
        if key and self.connection.get(_active_key(key)) == rq_job.id.encode():
            self.connection.delete(_active_key(key))
        log.warning("job %s: %s", rq_job.id, error)
        return error

    def counts(self) -> dict[str, int]:
        from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry

        counts = {"queued": self.queue.count, "running": StartedJobRegistry(queue=self.queue).count,
                  "finished": FinishedJobRegistry(queue=self.queue).count,
                  "failed": FailedJobRegistry(queue=self.queue).count}
        return {k: v for k, v in counts.items() if v}


def run_rq_job(target: str, kwargs: dict, key: str) -> dict:
    """What an RQ worker executes: `target(progress, **kwargs)` with progress saved in the job's meta,
    a heartbeat kept fresh, and a JobFailed message kept as the job's error."""
    import importlib

    from rq import get_current_job

    rq_job = get_current_job()
    connection = rq_job.connection
    stop = threading.Event()

    def beat() -> None:
        while True:
            connection.set(_alive_key(rq_job.id), b"1", ex=max(1, int(LOST_AFTER_S)))
            if stop.wait(HEARTBEAT_S):
                return

    heart = threading.Thread(target=beat, name="heartbeat", daemon=True)
    heart.start()

    def progress(update: dict) -> None:
        rq_job.meta["progress"] = {**(rq_job.meta.get("progress") or {}), **update}
        rq_job.save_meta()

    module, _, name = target.rpartition(".")
    fn = getattr(importlib.import_module(module), name)
    try:
        return fn(progress, **kwargs) or {}
    except JobFailed as exc:
        rq_job.meta["error"] = str(exc)
        rq_job.save_meta()
        raise
    except Exception as exc:
        rq_job.meta["error"] = f"{type(exc).__name__}: {exc}"
        rq_job.save_meta()
        raise
    finally:
        stop.set()
        heart.join(timeout=5)
        connection.delete(_alive_key(rq_job.id))
        if connection.get(_active_key(key)) == rq_job.id.encode():
            connection.delete(_active_key(key))


def work(redis_url: str, queue_name: str = "labelassist", burst: bool = False) -> bool:
    """Run an RQ worker on the queue (what `labelassist worker` does)."""
    from redis import Redis
    from rq import Queue, Worker

    # Each job runs in a forked work horse. Importing PyTorch and ultralytics once here (no model is
    # loaded, no device touched: forking stays safe) spares every job seconds of imports.
    try:
        from .backends.detect.yolo import import_ultralytics

        import_ultralytics()
    except ImportError:  # a worker without the `yolo` extra can still run other jobs
        log.info("ultralytics is not installed: detector jobs will fail on this worker")
    connection = Redis.from_url(redis_url)
    worker = Worker([Queue(queue_name, connection=connection)], connection=connection)
    return worker.work(burst=burst, with_scheduler=False)
