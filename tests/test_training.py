"""Retraining from Label Studio's Train button, in-process: a stand-in Label Studio serves the
project, its annotated tasks and images over real HTTP (label-studio-sdk reads them); the backend
trains a tiny YOLO, publishes, promotes and serves it. Faults: nothing is lost."""
from __future__ import annotations

import errno
import time

import pytest
import requests
from flask import Flask, abort, jsonify, request

from labelassist.adapters.label_studio.app import create_app
from labelassist.backends.registry import ModelRegistry
from labelassist.settings import Settings
from servers import png_bytes, serving
from synthetic_detection import CLASSES, make_detection_scene

LABELS = "".join(f'<Label value="{c}"/>' for c in CLASSES)
CONFIG = f'<View><Image name="img" value="$image"/><RectangleLabels name="r" toName="img">{LABELS}</RectangleLabels></View>'
SIZE = (160, 160)


def annotated_task(i: int, scene) -> dict:
    h, w = scene.image.shape[:2]
    result = [{"from_name": "r", "to_name": "img", "type": "rectanglelabels", "original_width": w,
               "original_height": h, "image_rotation": 0,
               "value": {"x": o.box[0] * 100 / w, "y": o.box[1] * 100 / h, "width": (o.box[2] - o.box[0]) * 100 / w,
                         "height": (o.box[3] - o.box[1]) * 100 / h, "rotation": 0, "rectanglelabels": [o.name]}}
              for o in scene.objects]
    return {"id": i, "data": {"image": f"/data/upload/{i}.png"}, "annotations": [
        {"id": 100 + i, "result": result, "was_cancelled": False, "created_at": "2026-11-23T10:00:00Z",
         "updated_at": "2026-11-23T10:00:00Z"}], "predictions": []}


def fake_label_studio(n: int, token: str = "legacy-token") -> Flask:
    scenes = [make_detection_scene(1000 + i, SIZE) for i in range(n)]
    tasks = [annotated_task(i, s) for i, s in enumerate(scenes)]
    images = {f"{i}.png": png_bytes(s.image) for i, s in enumerate(scenes)}
    app = Flask("fake-ls")

    @app.before_request
    def auth():
        if request.headers.get("Authorization") != f"Token {token}":
            abort(401)

    @app.get("/api/projects/<int:pid>/")
    def project(pid):
        return jsonify(id=pid, title="p", label_config=CONFIG)

    @app.get("/api/tasks/")
    def task_list():
        page, size = int(request.args.get("page", 1)), int(request.args.get("page_size", 100))
        chunk = tasks[(page - 1) * size: page * size]
        return jsonify(tasks=chunk, total=len(tasks), total_annotations=len(tasks), total_predictions=0)

    @app.get("/data/upload/<name>")
    def upload(name):
        return images[name], 200, {"Content-Type": "image/png"}

    return app


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


def version(url):
    return requests.post(f"{url}/setup", json={"schema": CONFIG}, timeout=10).json()["model_version"]


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
            after = version(url)
            assert after != before and after == job["result"]["model_version"]
            # the new version pre-labels: tasks on the stand-in's images
            tasks = [{"id": i, "data": {"image": f"/data/upload/{i}.png"}} for i in range(3)]
            preds = requests.post(f"{url}/predict", json={"tasks": tasks, "label_config": CONFIG}, timeout=60).json()
    assert all(p["model_version"] == after for p in preds["results"])
    assert sum(len(p["result"]) for p in preds["results"]) > 0
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
