"""Retraining from Label Studio's Train button, in-process: a stand-in Label Studio serves the
project, its annotated tasks and images over real HTTP (label-studio-sdk reads them); the backend
trains a tiny YOLO, publishes, promotes and serves it. Faults: nothing is lost."""
from __future__ import annotations

import errno
import time

import pytest
import requests

from labelassist.adapters.label_studio.app import create_app
from labelassist.backends.registry import ModelRegistry
from labelassist.settings import Settings
from fake_label_studio import CONFIG, fake_label_studio
from servers import serving



def settings_for(ls_url, tmp_path, **kw) -> Settings:
    base = dict(label_studio_url=ls_url, label_studio_api_key="legacy-token", media_cache_dir=tmp_path / "media",
                models_dir=tmp_path / "models", registry_dir=tmp_path / "models" / "registry", device="cpu",
                train_epochs=15, train_imgsz=160, train_export_attempts=2, train_export_backoff=0.01,
                uncertainty_tta="")
    base.update(kw)
    return Settings(**base)


def wait_job(url, job_id, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = requests.get(f"{url}/jobs/{job_id}", timeout=5).json()
        if job["state"] in ("finished", "failed"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not end: {job}")


def train_click(url, project=1):
    return requests.post(f"{url}/webhook", json={"action": "START_TRAINING", "project": {"id": project}}, timeout=10)


def health(url):
    return requests.get(f"{url}/health", timeout=10).json()


def version(url):
    return requests.post(f"{url}/setup", json={"schema": CONFIG}, timeout=10).json()["model_version"]


def assert_serves_new_version(url, before: str, job: dict) -> None:
    """/setup (which looks at the registry every time) gives a new model_version, /health names the
    job's registry version, and /predict pre-labels the stand-in's images with it."""
    after = version(url)
    assert after != before
    assert health(url)["detector"]["registry_version"] == job["result"]["version"]
    tasks = [{"id": i, "data": {"image": f"/data/upload/{i}.png"}} for i in range(3)]
    preds = requests.post(f"{url}/predict", json={"tasks": tasks, "label_config": CONFIG}, timeout=60).json()
    assert all(p["model_version"] == after for p in preds["results"])
    assert sum(len(p["result"]) for p in preds["results"]) > 0


@pytest.mark.slow
def test_train_button_trains_publishes_and_serves_the_new_version(tmp_path):
    with serving(fake_label_studio(75)) as ls:  # 60 train / 15 val images: learnable in 20 epochs
        settings = settings_for(ls, tmp_path, train_epochs=20)
        with serving(create_app(settings)) as url:
            before = version(url)
            first = train_click(url)
            assert first.status_code == 201, first.text
            second = train_click(url)  # a second click while it runs: no duplicate
            assert second.status_code == 200 and second.json()["job_id"] == first.json()["job_id"]
            job = wait_job(url, first.json()["job_id"])
            assert job["state"] == "finished", job
            assert job["progress"]["epochs"] == 20 and job["progress"]["epoch"] == 20
            assert job["result"]["promoted"] is True
            assert_serves_new_version(url, before, job)
    registry = ModelRegistry(settings.registry_dir)
    assert registry.current().version_id == job["result"]["version"]
    assert registry.current().calibration is not None  # refitted on the validation split


def test_label_studio_unreachable_fails_the_job_clearly(tmp_path):
    settings = settings_for("http://127.0.0.1:9", tmp_path)  # nothing listens on the discard port
    with serving(create_app(settings)) as url:
        before = version(url)
        job = wait_job(url, train_click(url).json()["job_id"], timeout=60)
        assert job["state"] == "failed"
        assert "Label Studio unreachable after 2 attempts" in job["error"]
        assert version(url) == before


@pytest.mark.parametrize("fault", ["crash mid-training", "disk full while saving"])
def test_a_failed_training_keeps_the_current_model_and_registry(tmp_path, monkeypatch, fault):
    import labelassist.backends.registry as registry_mod
    import labelassist.backends.train as train_mod

    if fault == "crash mid-training":
        def broken_train(data_yaml, base, out_dir, epochs, imgsz, device, progress):
            progress({"epoch": 1, "epochs": epochs})
            raise RuntimeError("worker killed")
        monkeypatch.setattr(train_mod, "train_detector", broken_train)
    else:
        def full_disk(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(registry_mod.shutil, "copyfileobj", full_disk)
        monkeypatch.setattr(registry_mod, "shutil", registry_mod.shutil)
    with serving(fake_label_studio(6)) as ls:
        settings = settings_for(ls, tmp_path, train_epochs=1)
        with serving(create_app(settings)) as url:
            before = version(url)
            job = wait_job(url, train_click(url).json()["job_id"])
            assert job["state"] == "failed", job
            assert ("worker killed" in job["error"]) if fault.startswith("crash") else ("No space left" in job["error"])
            assert version(url) == before
            assert requests.get(f"{url}/health", timeout=5).status_code == 200
    registry = ModelRegistry(settings.registry_dir)
    assert registry.current() is None and registry.versions() == []


def test_annotation_webhooks_need_the_shared_secret_and_count_to_n(tmp_path):
    settings = settings_for("http://127.0.0.1:9", tmp_path, train_after_annotations=2,
                            webhook_secret="s3cret", train_export_attempts=1)
    with serving(create_app(settings)) as url:
        body = {"action": "ANNOTATION_CREATED", "project": {"id": 1}, "annotation": {"id": 5}}
        denied = requests.post(f"{url}/webhook", json=body, timeout=5)
        assert denied.status_code == 401 and "WEBHOOK_SECRET" in denied.json()["error"]
        wrong = requests.post(f"{url}/webhook?secret=nope", json=body, timeout=5)
        assert wrong.status_code == 401
        one = requests.post(f"{url}/webhook?secret=s3cret", json=body, timeout=5)
        assert one.status_code == 200 and one.json()["status"] == "counted"
        two = requests.post(f"{url}/webhook", json=body, headers={"X-Labelassist-Secret": "s3cret"}, timeout=5)
        assert two.status_code == 201 and two.json()["job_id"]  # the second event starts training
        assert requests.get(f"{url}/jobs/nope", timeout=5).status_code == 404


def test_train_without_project_id_is_a_clear_4xx(tmp_path):
    with serving(create_app(settings_for("http://127.0.0.1:9", tmp_path))) as url:
        resp = requests.post(f"{url}/webhook", json={"action": "START_TRAINING"}, timeout=5)
    assert resp.status_code == 400 and "project id" in resp.json()["error"]


@pytest.mark.slow
def test_train_on_an_rq_worker_killed_mid_training_then_trained_by_another(tmp_path):
    """REDIS_URL set: the server only enqueues; `labelassist worker` processes (real RQ, real Redis)
    train and publish to the shared registry; the server follows the registry's pointer."""
    from servers import descendants, kill_tree, redis_server, worker_process

    with serving(fake_label_studio(75)) as ls, redis_server(tmp_path) as redis_url:
        settings = settings_for(ls, tmp_path, train_epochs=20, redis_url=redis_url)
        worker_env = {"REDIS_URL": redis_url, "LABEL_STUDIO_URL": ls, "LABEL_STUDIO_API_KEY": "legacy-token",
                      "REGISTRY_DIR": str(settings.registry_dir), "MODELS_DIR": str(settings.models_dir),
                      "MEDIA_CACHE_DIR": str(tmp_path / "worker-media"), "DEVICE": "cpu",
                      "TRAIN_EPOCHS": "20", "TRAIN_IMGSZ": "160", "UNCERTAINTY_TTA": ""}
        with serving(create_app(settings)) as url:
            before = version(url)
            with worker_process(worker_env, tmp_path / "worker1.log") as proc:
                first = train_click(url).json()["job_id"]
                deadline = time.time() + 120
                while requests.get(f"{url}/jobs/{first}", timeout=5).json()["progress"].get("epoch", 0) < 2:
                    assert time.time() < deadline, (tmp_path / "worker1.log").read_text()[-3000:]
                    time.sleep(0.2)
                assert descendants(proc.pid)
                kill_tree(proc.pid)  # mid-training, no goodbye
                proc.wait(5)
            killed = wait_job(url, first, timeout=60)
            assert killed["state"] == "failed" and "worker lost" in killed["error"]
            assert version(url) == before  # the old model keeps serving
            registry = ModelRegistry(settings.registry_dir)
            assert registry.current() is None and registry.versions() == []
            with worker_process(worker_env, tmp_path / "worker2.log"):
                second = train_click(url)
                assert second.status_code == 201 and second.json()["job_id"] != first
                job = wait_job(url, second.json()["job_id"])
            assert job["state"] == "finished", (job, (tmp_path / "worker2.log").read_text()[-3000:])
            assert job["result"]["promoted"] is True and job["progress"]["epoch"] == 20
            assert_serves_new_version(url, before, job)


def test_rollback_is_one_command_and_servers_follow_the_registry(tmp_path):
    import json
    import os
    import subprocess
    import sys

    import torch
    from labelassist.backends.detect.yolo import import_ultralytics

    import_ultralytics()
    from ultralytics import YOLO

    registry = ModelRegistry(tmp_path / "models" / "registry")
    for seed in (0, 1):  # two different (untrained) models, v0001 then v0002 promoted
        torch.manual_seed(seed)
        YOLO("yolov8n.yaml").save(tmp_path / f"w{seed}.pt")
        registry.promote(registry.publish(tmp_path / f"w{seed}.pt", metrics={"map50": 0.1 * seed}))
    settings = settings_for("http://127.0.0.1:9", tmp_path)
    env = {**os.environ, "REGISTRY_DIR": str(settings.registry_dir)}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "labelassist.cli", *args], env=env, capture_output=True,
                              text=True, timeout=60)

    with serving(create_app(settings)) as url:
        assert health(url)["detector"]["registry_version"] == "v0002"
        newest = version(url)
        back = cli("rollback")
        assert back.returncode == 0 and "v0001" in back.stdout, back.stderr
        assert version(url) != newest  # /setup looks at the registry on every call
        assert health(url)["detector"]["registry_version"] == "v0001"
        listed = json.loads(cli("models", "--json").stdout)
        assert [(r["version"], r["current"]) for r in listed] == [("v0001", True), ("v0002", False)]
        forward = cli("rollback", "v0002")  # "rollback" to any intact version, newer ones too
        assert forward.returncode == 0 and version(url) == newest
        unknown = cli("rollback", "v0042")
        assert unknown.returncode == 1 and "unknown model version 'v0042'" in unknown.stderr
