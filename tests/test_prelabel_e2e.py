"""A tiny YOLO trained here on synthetic scenes, served by `create_app` from YOLO_WEIGHTS, pre-labels
tasks through /predict: boxes land on the real objects, in Label Studio's percent coordinates."""
from __future__ import annotations

import numpy as np
import pytest
import requests

from labelassist.adapters.label_studio.app import create_app
from labelassist.settings import Settings
from servers import png_bytes, serving, upload_server
from synthetic_detection import CLASSES, box_iou, make_detection_scene
from tiny_models import train_tiny


@pytest.mark.slow
def test_trained_yolo_prelabels_tasks_through_the_server(tmp_path):
    weights, _ = train_tiny(tmp_path / "train", "yolov8n.yaml", "detect", epochs=20, imgsz=160, n_train=60)
    models = tmp_path / "models"
    models.mkdir()
    (models / "det.pt").write_bytes(weights.read_bytes())
    scenes = [make_detection_scene(100 + i, (160, 224)) for i in range(4)]
    files = {f"{i}.png": png_bytes(s.image) for i, s in enumerate(scenes)}
    labels = "".join(f'<Label value="{c.title()}"/>' for c in CLASSES)
    config = f'<View><Image name="img" value="$image"/><RectangleLabels name="r" toName="img">{labels}</RectangleLabels></View>'
    with serving(upload_server(files)) as media:
        settings = Settings(label_studio_url=media, media_cache_dir=tmp_path / "m", models_dir=models,
                            yolo_weights="det.pt", device="cpu")
        with serving(create_app(settings)) as url:
            health = requests.get(f"{url}/health", timeout=5).json()
            tasks = [{"id": i, "data": {"image": f"/data/upload/{i}.png"}} for i in range(len(scenes))]
            resp = requests.post(f"{url}/predict", json={"tasks": tasks, "label_config": config}, timeout=120)
            again = requests.post(f"{url}/predict", json={"tasks": tasks, "label_config": config}, timeout=120)
    assert health["detector"]["trained"] is True
    assert resp.status_code == 200, resp.text
    preds = resp.json()["results"]
    assert len(preds) == len(scenes)
    assert {p["model_version"] for p in preds} == {again.json()["results"][0]["model_version"]}
    hits = total = 0
    for scene, pred in zip(scenes, preds):
        h, w = scene.image.shape[:2]
        boxes = []
        for r in pred["result"]:
            v = r["value"]
            boxes.append(((v["x"] * w / 100, v["y"] * h / 100, (v["x"] + v["width"]) * w / 100,
                           (v["y"] + v["height"]) * h / 100), v["rectanglelabels"][0].lower()))
            assert 0 <= r["score"] <= 1
        for obj in scene.objects:
            total += 1
            hits += any(label == obj.name and box_iou(b, obj.box) >= 0.5 for b, label in boxes)
        assert 0 <= pred["score"] <= 1
    assert hits / total >= 0.5, f"found {hits} of {total} objects"
