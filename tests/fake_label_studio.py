"""A stand-in for the part of Label Studio's API a training job reads: the project (label config), its
annotated tasks (paginated, as label-studio-sdk reads them, legacy-token auth) and uploaded images,
served over real HTTP. Used by the training tests and bench/train.py."""
from __future__ import annotations

from flask import Flask, abort, jsonify, request

from servers import png_bytes
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


def fake_label_studio(n: int, token: str = "legacy-token", first_seed: int = 1000) -> Flask:
    """Project 1 with `n` annotated tasks; `app.config["visible"]` limits how many the API lists (set it
    to show annotations arriving over time)."""
    scenes = [make_detection_scene(first_seed + i, SIZE) for i in range(n)]
    tasks = [annotated_task(i, s) for i, s in enumerate(scenes)]
    images = {f"{i}.png": png_bytes(s.image) for i, s in enumerate(scenes)}
    app = Flask("fake-ls")
    app.config["visible"] = n

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
        visible = tasks[: app.config["visible"]]
        chunk = visible[(page - 1) * size: page * size]
        return jsonify(tasks=chunk, total=len(visible), total_annotations=len(visible), total_predictions=0)

    @app.get("/data/upload/<name>")
    def upload(name):
        return images[name], 200, {"Content-Type": "image/png"}

    return app


