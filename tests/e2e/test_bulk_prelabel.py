"""`labelassist prelabel --project N` against a real Label Studio, sharded over two real RQ workers
on a real Redis: one worker is killed mid-run, and still every task ends with exactly one prediction
of the current model version; a rerun adds nothing."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from labelassist.demo import make_scene
from labelassist.jobs import RQJobRunner
from servers import kill_tree, redis_server, signal_tree, worker_process

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CONFIG = """<View><Image name="image" value="$image"/>
<RectangleLabels name="box" toName="image"><Label value="Disc"/><Label value="Square"/></RectangleLabels></View>"""
N_TASKS = 24


def _busy_job(redis_url: str, pid: int) -> str | None:
    from redis import Redis
    from rq import Worker

    for w in Worker.all(connection=Redis.from_url(redis_url)):
        if w.pid == pid and w.get_current_job_id():
            return w.get_current_job_id()
    return None


def test_bulk_prelabel_on_two_workers_survives_a_killed_worker(stack, tmp_path):
    from labelassist.backends.detect.yolo import import_ultralytics

    import_ultralytics()
    from ultralytics import YOLO

    ls = stack.ls
    project = ls.create_project("bulk pre-labels", CONFIG)["id"]
    ls.upload_images(project, {f"bulk-{i}.png": make_scene(500 + i, (240, 320)).png() for i in range(N_TASKS)})
    tasks = [t["id"] for t in ls.tasks(project)]
    assert len(tasks) == N_TASKS
    weights = tmp_path / "models" / "detector.pt"
    weights.parent.mkdir(parents=True)
    YOLO("yolov8n.yaml").save(weights)  # an architecture with weights: it runs like a trained one

    with redis_server(tmp_path) as redis_url:
        env = {"REDIS_URL": redis_url, "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.pat,
               "MODELS_DIR": str(weights.parent), "YOLO_WEIGHTS": str(weights),
               "REGISTRY_DIR": str(tmp_path / "models" / "registry"), "SEGMENTER": "grabcut", "DEVICE": "cpu",
               "MEDIA_CACHE_DIR": str(tmp_path / "media"), "DETECT_BATCH": "2"}

        def prelabel():
            return subprocess.Popen([sys.executable, "-m", "labelassist.cli", "prelabel", "--project", str(project),
                                     "--shard-size", "3"], env={**os.environ, **env}, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)

        with worker_process(env, tmp_path / "w1.log") as w1, worker_process(env, tmp_path / "w2.log"):
            run = prelabel()
            runner = RQJobRunner(redis_url)
            deadline = time.time() + 120
            while True:  # freeze worker 1 while it holds a shard that is not finished, then kill it
                assert run.poll() is None and time.time() < deadline, (
                    run.stdout.read() if run.poll() is not None else "worker 1 never got busy",
                    (tmp_path / "w1.log").read_text()[-3000:])
                busy = _busy_job(redis_url, w1.pid)
                if busy:
                    signal_tree(w1.pid, signal.SIGSTOP)
                    if runner.get(busy).state == "running":
                        break
                    signal_tree(w1.pid, signal.SIGCONT)
                time.sleep(0.1)
            kill_tree(w1.pid)  # worker 1 dies in the middle of a shard
            w1.wait(5)
            out, _ = run.communicate(timeout=300)
            assert run.returncode == 0, (out[-3000:], (tmp_path / "w2.log").read_text()[-3000:])

            preds = stack.call("list predictions", "GET", "/api/predictions/", params={"project": project}).json()
            versions = {p["model_version"] for p in preds}
            assert len(versions) == 1, versions
            assert Counter(p["task"] for p in preds) == Counter(tasks), "every task exactly one prediction"
            (tmp_path / "cli.log").write_text(out)
            assert "worker lost" in out and "retrying" in out, out[-3000:]  # the killed shard ran again

            again = prelabel()
            out2, _ = again.communicate(timeout=300)
            assert again.returncode == 0 and "imported 0 predictions" in out2, out2[-2000:]
            assert f"{N_TASKS} tasks already had one" in out2, out2[-2000:]
        after = stack.call("list predictions again", "GET", "/api/predictions/", params={"project": project}).json()
        assert sorted(p["id"] for p in after) == sorted(p["id"] for p in preds)
