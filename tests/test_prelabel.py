"""Pre-labels through the real server: every control type, decoded back to geometry, with a stand-in
detector whose regions are known (the real YOLO path is covered in test_yolo and the slow test)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import requests
from label_studio_sdk.converter.brush import decode_rle

from labelassist.adapters.label_studio.app import create_app
from labelassist.adapters.label_studio.media import MediaFetcher
from labelassist.adapters.label_studio.prelabel import Prelabeler, resolve_model_path
from labelassist.adapters.label_studio.service import Service
from labelassist.adapters.errors import ApiError
from labelassist.backends.segment.grabcut import GrabCutSegmenter
from labelassist.backends.types import Region
from labelassist.backends.uncertainty import UncertaintyEstimator
from labelassist.settings import Settings
from servers import png_bytes, serving, upload_server

W, H = 400, 200


class FakeDetector:
    """Answers every image with the same regions; records how it was called."""

    def __init__(self, task, regions, names, model_id="fake-1"):
        self.task, self.regions, self.model_id, self.trained, self.conf = task, regions, model_id, True, 0.25
        self.class_names = dict(enumerate(names))
        self.calls = []

    def predict(self, images, conf=None):
        self.calls.append(len(images))
        return [[r for r in self.regions if r.score >= (conf or self.conf)] for _ in images]

    def describe(self):
        return {"detector": "fake", "model_id": self.model_id, "trained": True}


def box(label, x0, y0, x1, y1, angle=0.0, score=0.9, u=0.1):
    return Region(label, "box", (x0, y0, x1, y1, angle), score, u)


@pytest.fixture(scope="module")
def media():
    img = np.zeros((H, W, 3), np.uint8)
    with serving(upload_server({f"{i}.png": png_bytes(img) for i in range(5)})) as url:
        yield url


def server(media, tmp_path, detector, **kw):
    settings = Settings(label_studio_url=media, media_cache_dir=tmp_path / "m", models_dir=tmp_path, **kw)
    pre = Prelabeler(UncertaintyEstimator(detector, tta=()), tmp_path,
                     load=lambda p: (_ for _ in ()).throw(ValueError(f"corrupt file {p.name}")))
    service = Service(GrabCutSegmenter(), MediaFetcher(settings), 10**8, prelabeler=pre)
    return serving(create_app(settings, service))


def predict(url, config, n=1):
    tasks = [{"id": i, "data": {"image": f"/data/upload/{i}.png"}} for i in range(n)]
    return requests.post(f"{url}/predict", json={"tasks": tasks, "label_config": config}, timeout=30)


def cfg(body):
    return f'<View><Image name="img" value="$image"/>{body}</View>'


def test_boxes_with_rotation_in_percent_and_label_mapping(media, tmp_path):
    det = FakeDetector("detect", [box("car", 40, 20, 140, 70), box("Truck", 200, 100, 300, 180, angle=30.0),
                                  box("boat", 0, 0, 10, 10)], ["car", "Truck", "boat"])
    config = cfg('<RectangleLabels name="r" toName="img"><Label value="Car"/>'
                 '<Label value="Lorry" predicted_values="truck,van"/><Label value="Bike"/></RectangleLabels>')
    with server(media, tmp_path, det) as url:
        resp = predict(url, config, n=3)
        assert resp.status_code == 200, resp.text
        preds = resp.json()["results"]
        setup = requests.post(f"{url}/setup", json={"schema": config}, timeout=5).json()
    assert len(preds) == 3 and det.calls == [3]  # one batched call for three tasks
    results = preds[0]["result"]
    assert [r["value"]["rectanglelabels"] for r in results] == [["Car"], ["Lorry"]]  # boat dropped
    car, lorry = results
    v = car["value"]
    assert (v["x"] * W / 100, v["y"] * H / 100, v["width"] * W / 100, v["height"] * H / 100) == pytest.approx((40, 20, 100, 50))
    assert lorry["value"]["rotation"] == 30.0 and lorry["value"]["width"] * W / 100 == pytest.approx(100)
    assert car["score"] == 0.9 and preds[0]["model_version"] == setup["model_version"]
    assert setup["labels_without_model_class"] == {"r": ["Bike"]}
    assert car["meta"]["text"][0].startswith("uncertainty ")
    assert 0 < preds[0]["score"] < 1


def test_task_score_drops_with_uncertain_regions_and_possible_misses(media, tmp_path):
    confident = [box("car", 40, 20, 140, 70, score=0.95)]
    config = cfg('<RectangleLabels name="r" toName="img"><Label value="Car"/></RectangleLabels>')
    answers = {}
    for name, regions in {"clean": confident,
                          "plus a doubtful box": confident + [box("car", 200, 100, 260, 160, score=0.3)],
                          "plus a possible miss": confident + [box("car", 200, 100, 260, 160, score=0.1)]}.items():
        with server(media, tmp_path, FakeDetector("detect", regions, ["car"])) as url:
            (answers[name],) = predict(url, config).json()["results"]
    clean = answers["clean"]["score"]
    assert answers["plus a doubtful box"]["score"] < clean
    assert answers["plus a possible miss"]["score"] < clean
    # the candidate below the threshold is not shown, it only lowers the task score
    assert len(answers["plus a possible miss"]["result"]) == 1 and len(answers["plus a doubtful box"]["result"]) == 2


def test_instance_masks_as_polygons_and_brush(media, tmp_path):
    mask = np.zeros((H, W), bool)
    cv2.circle(mask.view(np.uint8), (100, 100), 40, 1, -1)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    outline = contours[0].reshape(-1, 2).astype(float)
    det = FakeDetector("segment", [Region("cell", "polygon", outline, 0.8, 0.3, extra={"mask": mask})], ["cell"])
    config = cfg('<PolygonLabels name="p" toName="img"><Label value="Cell"/></PolygonLabels>'
                 '<BrushLabels name="b" toName="img"><Label value="Cell"/></BrushLabels>'
                 '<RectangleLabels name="r" toName="img"><Label value="Cell"/></RectangleLabels>')
    with server(media, tmp_path, det) as url:
        (pred,) = predict(url, config).json()["results"]
    by = {r["type"]: r for r in pred["result"]}
    assert set(by) == {"polygonlabels", "brushlabels"}  # a segment model fills no rectangle control
    brush = decode_rle(by["brushlabels"]["value"]["rle"]).reshape(H, W, 4)[:, :, 3] > 127
    assert (brush == mask).all()
    pts = np.array(by["polygonlabels"]["value"]["points"]) * [W / 100, H / 100] - 0.5
    poly = np.zeros((H, W), np.uint8)
    cv2.fillPoly(poly, [np.round(pts).astype(np.int32)], 1)
    assert (poly.astype(bool) & mask).sum() / (poly.astype(bool) | mask).sum() > 0.95
    assert by["polygonlabels"]["value"]["polygonlabels"] == ["Cell"]


def test_keypoints_one_region_per_visible_point_named_by_the_config(media, tmp_path):
    kps = np.array([[50, 40, 0.9], [60, 80, 0.0], [100, 150, 0.8]])
    det = FakeDetector("pose", [Region("person", "keypoints", kps, 0.9, 0.2,
                                       extra={"keypoint_names": ["nose", "left_eye", "tail"]})], ["person"])
    config = cfg('<KeyPointLabels name="k" toName="img"><Label value="Nose"/><Label value="Tail"/></KeyPointLabels>')
    with server(media, tmp_path, det) as url:
        (pred,) = predict(url, config).json()["results"]
    points = [(r["value"]["x"] * W / 100, r["value"]["y"] * H / 100, r["value"]["keypointlabels"]) for r in pred["result"]]
    assert points == [(pytest.approx(50), pytest.approx(40), ["Nose"]), (pytest.approx(100), pytest.approx(150), ["Tail"])]


def test_classification_to_choices(media, tmp_path):
    det = FakeDetector("classify", [Region("dog", "class", None, 0.7, 0.4)], ["cat", "dog"])
    config = cfg('<Choices name="c" toName="img"><Choice value="Cat"/><Choice value="Dog"/></Choices>')
    with server(media, tmp_path, det) as url:
        (pred,) = predict(url, config).json()["results"]
    (choice,) = pred["result"]
    assert choice["type"] == "choices" and choice["value"] == {"choices": ["Dog"]} and choice["score"] == 0.7


def test_untrained_detector_prelabels_nothing_and_says_so(media, tmp_path):
    from labelassist.backends.detect import YoloDetector

    settings = Settings(label_studio_url=media, media_cache_dir=tmp_path / "m")
    pre = Prelabeler(UncertaintyEstimator(YoloDetector.untrained()), tmp_path, load=lambda p: None)
    service = Service(GrabCutSegmenter(), MediaFetcher(settings), 10**8, prelabeler=pre)
    with serving(create_app(settings, service)) as url:
        health = requests.get(f"{url}/health", timeout=5).json()
        preds = predict(url, cfg('<RectangleLabels name="r" toName="img"><Label value="A"/></RectangleLabels>'), 2)
    assert health["detector"]["trained"] is False
    assert [p["result"] for p in preds.json()["results"]] == [[], []]


def test_model_path_outside_models_folder_and_corrupt_weights_are_4xx(media, tmp_path):
    det = FakeDetector("detect", [], ["a"])
    (tmp_path / "broken.pt").write_bytes(b"not a model")
    outside = cfg('<RectangleLabels name="r" toName="img" model_path="../../etc/passwd"><Label value="A"/></RectangleLabels>')
    corrupt = cfg('<RectangleLabels name="r" toName="img" model_path="broken.pt"><Label value="A"/></RectangleLabels>')
    with server(media, tmp_path, det) as url:
        r1 = predict(url, outside)
        r2 = predict(url, corrupt)
        r3 = requests.post(f"{url}/setup", json={"schema": corrupt}, timeout=5)
    assert r1.status_code == 400 and "outside the models folder" in r1.json()["error"]
    assert r2.status_code == 400 and "broken.pt" in r2.json()["error"]
    assert r3.status_code == 400 and "broken.pt" in r3.json()["error"]


def test_resolve_model_path(tmp_path):
    assert resolve_model_path(tmp_path, "a/b.pt") == (tmp_path / "a/b.pt").resolve()
    assert resolve_model_path(tmp_path, str(tmp_path / "c.pt")) == (tmp_path / "c.pt").resolve()
    for bad in ["../x.pt", "/etc/passwd", "a/../../x.pt"]:
        with pytest.raises(ApiError):
            resolve_model_path(tmp_path, bad)


def test_calibration_beside_the_weights_is_loaded_and_changes_model_version(tmp_path):
    import json

    from labelassist.adapters.label_studio.app import build_prelabeler
    from labelassist.adapters.label_studio.service import Service
    from labelassist.backends.detect import ModelLoadError
    from labelassist.backends.detect.yolo import import_ultralytics
    from labelassist.backends.uncertainty import Calibrator, calibration_path

    import_ultralytics()
    from ultralytics import YOLO

    weights = tmp_path / "det.pt"
    YOLO("yolov8n.yaml").save(weights)  # an architecture file: nothing is downloaded
    settings = Settings(models_dir=tmp_path, yolo_weights="det.pt", device="cpu", media_cache_dir=tmp_path / "m")

    def version():
        pre = build_prelabeler(settings)
        return Service(GrabCutSegmenter(), MediaFetcher(settings), 1, prelabeler=pre).model_version, pre

    plain, pre = version()
    assert pre.default.calibrator.is_identity and plain == version()[0]  # stable across builds
    rng = np.random.default_rng(0)
    raw = rng.random(200)
    fitted = Calibrator().fit(raw, rng.random(200) < raw)
    estimator = pre.default
    estimator.calibrator = fitted
    calibration_path(weights).write_text(json.dumps(estimator.to_dict()))
    calibrated, pre2 = version()
    assert not pre2.default.calibrator.is_identity
    assert calibrated != plain
    calibration_path(weights).write_text("{not json")
    with pytest.raises(ModelLoadError, match="det.calibration.json"):
        build_prelabeler(settings)


def test_explicit_model_that_cannot_fill_its_control_is_a_clear_4xx(media, tmp_path):
    det = FakeDetector("detect", [box("car", 1, 1, 50, 50)], ["car", "bus"])
    models = {"boxes.pt": det, "pose.pt": FakeDetector("pose", [], ["person"])}
    settings = Settings(label_studio_url=media, media_cache_dir=tmp_path / "m", models_dir=tmp_path)
    pre = Prelabeler(UncertaintyEstimator(FakeDetector("detect", [], ["x"])), tmp_path,
                     load=lambda p: UncertaintyEstimator(models[p.name], tta=()))
    service = Service(GrabCutSegmenter(), MediaFetcher(settings), 10**8, prelabeler=pre)
    no_class = cfg('<RectangleLabels name="r" toName="img" model_path="boxes.pt"><Label value="Tree"/></RectangleLabels>')
    wrong_kind = cfg('<RectangleLabels name="r" toName="img" model_path="pose.pt"><Label value="Person"/></RectangleLabels>')
    mapped = cfg('<RectangleLabels name="r" toName="img" model_path="boxes.pt">'
                 '<Label value="Tree"/><Label value="Vehicle" predicted_values="car"/></RectangleLabels>')
    with serving(create_app(settings, service)) as url:
        r1 = requests.post(f"{url}/setup", json={"schema": no_class}, timeout=5)
        r2 = predict(url, wrong_kind)
        r3 = requests.post(f"{url}/setup", json={"schema": mapped}, timeout=5)
        r4 = predict(url, mapped)
    assert r1.status_code == 400 and "none of its labels ['Tree']" in r1.json()["error"] and "car" in r1.json()["error"]
    assert r2.status_code == 400 and "pose model" in r2.json()["error"]
    assert r3.status_code == 200 and r3.json()["labels_without_model_class"] == {"r": ["Tree"]}
    assert [r["value"]["rectanglelabels"] for r in r4.json()["results"][0]["result"]] == [["Vehicle"]]
