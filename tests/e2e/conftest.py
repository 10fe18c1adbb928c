"""A real Label Studio (from .venv-ls) and our backend (`labelassist serve`), started once per session
on loopback and stopped, process groups and all, at the end. The same start/stop and project code
as `make demo` (labelassist/demo.py)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from flask import Flask, abort

from labelassist.demo import DEMO_CONFIG, Backend, LabelStudio, Scene, label_studio_bin, make_scene
from servers import serving

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"


def ls_call(ls: LabelStudio, step: str, method: str, path: str, **kw):
    """One Label Studio API call that must succeed; a failure names the step and shows the answer."""
    return ls.call(step, method, path, **kw)


@dataclass
class Stack:
    ls: LabelStudio
    backend: Backend
    project: int
    ml: int
    #: task id -> the scene its image shows
    scenes: dict[int, Scene]
    uploaded: list[int]
    by_url: list[int]

    def call(self, step: str, method: str, path: str, **kw):
        return ls_call(self.ls, step, method, path, **kw)


def _url_images(scenes: dict[str, Scene]) -> Flask:
    app = Flask("url-images")

    @app.get("/<name>")
    def image(name):
        if name not in scenes:
            abort(404)
        return scenes[name].png(), 200, {"Content-Type": "image/png"}

    return app


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    try:
        label_studio_bin()
    except FileNotFoundError as exc:  # `make test` installs it; a bare `pytest` run says how
        pytest.fail(str(exc))
    work = tmp_path_factory.mktemp("e2e")
    uploads = {f"upload-{i}.png": make_scene(200 + i) for i in range(3)}
    url_scenes = {f"url-{i}.png": make_scene(300 + i) for i in range(2)}
    with serving(_url_images(url_scenes)) as media:
        ls = LabelStudio.start(work / "label-studio")
        backend = None
        try:
            # Training (the last e2e test) from 5 images: short, small, on the CPU.
            backend = Backend.start(work / "labelassist", ls, train_epochs="30", train_imgsz="160",
                                    device="cpu")
            project = ls.create_project("labelassist e2e", DEMO_CONFIG)["id"]
            ls.upload_images(project, {name: s.png() for name, s in uploads.items()})
            ls.import_tasks(project, [{"image": f"{media}/{name}"} for name in url_scenes])
            ml = ls.connect_backend(project, backend.url)["id"]
            scenes, uploaded, by_url = {}, [], []
            for task in ls.tasks(project):
                image = task["data"]["image"]
                name = image.rsplit("/", 1)[-1]
                if image.startswith(media):
                    scenes[task["id"]] = url_scenes[name]
                    by_url.append(task["id"])
                else:  # Label Studio prefixes uploads with a random id: "/data/upload/1/5f3c2a1b-upload-0.png"
                    scenes[task["id"]] = uploads[name.split("-", 1)[1]]
                    uploaded.append(task["id"])
            yield Stack(ls, backend, project, ml, scenes, uploaded, by_url)
        finally:
            if backend is not None:
                backend.stop()
            ls.stop()
            ARTIFACTS.mkdir(exist_ok=True)
            for log in (ls.log_path, backend.log_path if backend else None):
                if log is not None and log.exists():
                    (ARTIFACTS / log.name).write_bytes(log.read_bytes())
