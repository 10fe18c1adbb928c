"""Bulk pre-labels for a whole project: `labelassist prelabel --project N`.

The project's task ids are cut into shards. A shard job reads its tasks from Label Studio (with
label-studio-sdk), skips every task that already holds a prediction of the model version this
process serves (so a rerun, or a shard retried after a lost worker, adds nothing twice), runs the
detector in batches and imports the shard's predictions in one call. Without REDIS_URL the shards run
here, one after the other; with it they are RQ jobs that `labelassist worker` processes on any number
of machines execute, and this command follows them, retrying shards whose worker was lost.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

from ...jobs import ACTIVE, JobFailed
from ...settings import Settings
from .client import label_studio_client, with_retries
from .config import parse_label_config

log = logging.getLogger(__name__)


def build_prelabel_service(settings: Settings):
    """What a server with these settings serves (hence the same model_version on the predictions),
    without the shared embedding cache: bulk pre-labels compute no embeddings."""
    from .app import build_service

    return build_service(settings, shared=False)


def project_task_ids(settings: Settings, project_id: int) -> list[int]:
    client = label_studio_client(settings, "pre-labelling")
    s = settings
    return with_retries(f"listing the tasks of project {project_id}",
                        lambda: [t.id for t in client.tasks.list(project=project_id, fields="task_only", page_size=1000)],
                        s.train_export_attempts, s.train_export_backoff)


def prelabel_shard(progress: Callable[[dict], None], project_id: int, task_ids: list[int],
                   settings: Settings | None = None, service=None) -> dict:
    """Pre-label these tasks of the project (a job: RQ workers import it by name)."""
    from ...settings import get_settings

    s = settings or get_settings()
    client = label_studio_client(s, "pre-labelling")
    service = service or build_prelabel_service(s)
    version = service.model_version
    if service.prelabeler is None or not service.prelabeler.default.detector.trained:
        raise JobFailed("the detector is untrained (no YOLO_WEIGHTS and no trained version in REGISTRY_DIR): "
                        "nothing to pre-label with")
    project = with_retries(f"reading project {project_id}", lambda: client.projects.get(id=project_id),
                           s.train_export_attempts, s.train_export_backoff)
    config = parse_label_config(project.label_config)
    todo, skipped = [], 0
    for task_id in task_ids:
        task = with_retries(f"reading task {task_id}", lambda: client.tasks.get(id=task_id),
                            s.train_export_attempts, s.train_export_backoff)
        if any(_field(p, "model_version") == version for p in (_field(task, "predictions") or [])):
            skipped += 1
            continue
        todo.append({"id": task.id, "data": dict(task.data or {})})
    progress({"tasks": len(task_ids), "skipped": skipped, "done": skipped})
    predictions: list[dict[str, Any]] = []
    for start in range(0, len(todo), s.detect_batch):
        chunk = todo[start:start + s.detect_batch]
        for task, pred in zip(chunk, service.prelabel(chunk, config)):
            predictions.append({"task": task["id"], **pred})
        progress({"done": skipped + len(predictions)})
    if predictions:
        with_retries(f"importing {len(predictions)} predictions into project {project_id}",
                     lambda: client.projects.import_predictions(id=project_id, request=predictions),
                     s.train_export_attempts, s.train_export_backoff)
    return {"imported": len(predictions), "skipped": skipped, "model_version": version}


def _field(obj, name: str):
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def shards(task_ids: list[int], size: int) -> list[list[int]]:
    return [task_ids[i:i + size] for i in range(0, len(task_ids), size)]


def run_local(settings: Settings, project_id: int, task_ids: list[int], shard_size: int, bar) -> dict:
    """Every shard in this process, in order; a rerun resumes where the last one stopped."""
    service = build_prelabel_service(settings)
    totals = {"imported": 0, "skipped": 0}
    for ids in shards(task_ids, shard_size):
        seen = [0]

        def progress(update: dict, seen=seen) -> None:
            if "done" in update:
                bar.update(update["done"] - seen[0])
                seen[0] = update["done"]

        result = prelabel_shard(progress, project_id, ids, settings, service)
        totals["imported"] += result["imported"]
        totals["skipped"] += result["skipped"]
        totals["model_version"] = result["model_version"]
    return totals


def run_sharded(runner, project_id: int, task_ids: list[int], shard_size: int, bar, attempts: int = 3,
                poll: float = 0.5) -> dict:
    """Shards as jobs on the RQ queue; follows them, resubmitting failed ones up to `attempts` times."""
    pending = {i: ids for i, ids in enumerate(shards(task_ids, shard_size))}
    tries = {i: 0 for i in pending}
    jobs: dict[int, str] = {}
    done_by_shard: dict[int, int] = {}
    totals = {"imported": 0, "skipped": 0, "failed_shards": 0}
    while pending:
        for i, ids in pending.items():
            if i not in jobs:
                tries[i] += 1
                job, _ = runner.submit("prelabel", f"prelabel:{project_id}:{ids[0]}-{ids[-1]}", prelabel_shard,
                                       {"project_id": project_id, "task_ids": ids})
                jobs[i] = job.id
        time.sleep(poll)
        for i in list(pending):
            job = runner.get(jobs[i])
            done_by_shard[i] = int((job.progress or {}).get("done", 0)) if job else 0
            if job is None or job.state in ACTIVE:
                continue
            if job.state == "finished":
                totals["imported"] += job.result.get("imported", 0)
                totals["skipped"] += job.result.get("skipped", 0)
                totals["model_version"] = job.result.get("model_version")
                done_by_shard[i] = len(pending.pop(i))
            elif tries[i] < attempts:
                log.warning("shard %d (tasks %d-%d) failed (%s); retrying", i, pending[i][0], pending[i][-1],
                            job.error)
                done_by_shard[i] = 0
                del jobs[i]
            else:
                log.error("shard %d failed %d times, last: %s", i, tries[i], job.error)
                totals["failed_shards"] += 1
                totals.setdefault("errors", []).append(job.error)
                pending.pop(i)
        bar.n = sum(done_by_shard.values())
        bar.refresh()
    return totals


def main(settings: Settings, project_id: int, shard_size: int, local: bool) -> int:
    from tqdm import tqdm

    from ...jobs import RQJobRunner

    with tqdm(desc=f"project {project_id}", unit="task", total=None, dynamic_ncols=True) as bar:
        try:
            task_ids = project_task_ids(settings, project_id)
            bar.total = len(task_ids)
            bar.refresh()
            if settings.redis_url is not None and not local:
                runner = RQJobRunner(settings.redis_url.get_secret_value(), settings.queue_name, settings.job_timeout)
                totals = run_sharded(runner, project_id, task_ids, shard_size, bar)
            else:
                totals = run_local(settings, project_id, task_ids, shard_size, bar)
        except JobFailed as exc:
            bar.close()
            print(f"labelassist: pre-labelling failed: {exc}")
            return 1
    print(f"imported {totals['imported']} predictions ({totals.get('model_version', '-')}); "
          f"{totals['skipped']} tasks already had one of this version"
          + (f"; {totals['failed_shards']} shards failed: {totals['errors'][-1]}" if totals.get("failed_shards") else ""))
    return 1 if totals.get("failed_shards") else 0
