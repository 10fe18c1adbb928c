"""Our backend inside a real Label Studio 1.23: connect it, pre-label every task through Label
Studio's own action, and answer a smart keypoint through Label Studio's interactive endpoint."""
from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest
import requests
from label_studio_sdk.converter.brush import decode_rle

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_tasks_from_uploads_and_urls_are_imported(stack):
    assert len(stack.uploaded) == 3, f"uploaded tasks: {stack.uploaded}"
    assert len(stack.by_url) == 2, f"URL tasks: {stack.by_url}"


def test_backend_shows_connected(stack):
    ml = stack.call("read the ML backend", "GET", f"/api/ml/{stack.ml}").json()
    ours = requests.get(f"{stack.backend.url}/health", timeout=5).json()
    assert ml["readable_state"] == "Connected", ml
    assert ml["state"] == "CO" and ml["is_interactive"] is True, ml
    assert ml["model_version"] == ours["model_version"], (ml, ours)
    listed = stack.call("list the project's ML backends", "GET", "/api/ml/", params={"project": stack.project}).json()
    assert [m["id"] for m in listed] == [stack.ml]


def _predictions(stack) -> list[dict]:
    return stack.call("list the predictions", "GET", "/api/predictions/", params={"project": stack.project}).json()


def _retrieve(stack, step: str) -> dict:
    # The Data Manager's "Retrieve Predictions" action: Label Studio posts every selected task
    # to our /predict in one batch and stores one prediction per task.
    return stack.call(step, "POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions",
                                                               "project": stack.project},
                      json={"selectedItems": {"all": True, "excluded": []}}).json()


def test_retrieve_predictions_stores_one_per_task_and_no_duplicates(stack):
    version = requests.get(f"{stack.backend.url}/health", timeout=5).json()["model_version"]
    answer = _retrieve(stack, "retrieve predictions")
    assert answer["processed_items"] == len(stack.scenes), answer
    first = _predictions(stack)
    ours = [p for p in first if p["model_version"] == version]
    assert Counter(p["task"] for p in ours) == Counter(list(stack.scenes)), first
    # The detector is untrained by default: Label Studio stores the empty prediction as it is,
    # result [] with our task score, so the task counts as predicted by this model version.
    for p in ours:
        assert p["result"] == [] and p["score"] == 0.0, p
    _retrieve(stack, "retrieve predictions again")
    again = _predictions(stack)
    assert sorted(p["id"] for p in again) == sorted(p["id"] for p in first), "second retrieval added predictions"
    assert "POST /predict" in stack.backend.log()


def _smart_click(stack, task: int, x: float, y: float) -> dict:
    context = {"result": [{
        "id": "click1", "from_name": "kp", "to_name": "image", "type": "keypointlabels", "origin": "manual",
        "is_positive": True, "value": {"x": x, "y": y, "width": 0.6, "keypointlabels": ["Disc"]}}]}
    return stack.call(f"interactive annotating on task {task}", "POST",
                      f"/api/ml/{stack.ml}/interactive-annotating", json={"task": task, "context": context}).json()


@pytest.mark.parametrize("source", ["uploaded", "by_url"])
def test_smart_keypoint_through_label_studio_returns_the_object_mask(stack, source):
    task = getattr(stack, source)[0]
    scene = stack.scenes[task]
    answer = _smart_click(stack, task, *scene.center_percent())
    assert "errors" not in answer, answer
    data = answer["data"]
    by_type = {r["type"]: r for r in data["result"]}
    assert set(by_type) == {"brushlabels", "polygonlabels"}, data["result"]
    brush = by_type["brushlabels"]
    h, w = scene.mask.shape
    assert (brush["original_height"], brush["original_width"]) == (h, w)
    assert brush["value"]["brushlabels"] == ["Disc"] and brush["from_name"] == "mask"
    mask = decode_rle(brush["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 127
    assert iou(mask, scene.mask) > 0.8, f"IoU {iou(mask, scene.mask):.3f} on task {task}"
    assert by_type["polygonlabels"]["value"]["polygonlabels"] == ["Disc"]
    assert len(by_type["polygonlabels"]["value"]["points"]) >= 8


def test_a_failing_step_names_itself_and_shows_what_label_studio_answered(stack):
    with pytest.raises(AssertionError) as err:
        stack.call("read a missing task", "GET", "/api/tasks/999999")
    text = str(err.value)
    assert "read a missing task" in text and "404" in text and "GET /api/tasks/999999" in text


def _box_annotation(scene) -> list[dict]:
    h, w = scene.mask.shape
    ys, xs = np.nonzero(scene.mask)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    return [{"from_name": "box", "to_name": "image", "type": "rectanglelabels", "origin": "manual",
             "original_width": w, "original_height": h, "image_rotation": 0,
             "value": {"x": x0 * 100 / w, "y": y0 * 100 / h, "width": (x1 - x0) * 100 / w,
                       "height": (y1 - y0) * 100 / h, "rotation": 0, "rectanglelabels": ["Disc"]}}]


def test_annotations_then_train_button_give_a_new_model_version_and_fresh_predictions(stack):
    """Runs last (file order): annotate every task, press Train through Label Studio's API, and see
    Label Studio pick up the new model version and store fresh predictions from it."""
    before = requests.get(f"{stack.backend.url}/health", timeout=5).json()["model_version"]
    for task, scene in stack.scenes.items():
        stack.call(f"annotate task {task}", "POST", f"/api/tasks/{task}/annotations/",
                   json={"result": _box_annotation(scene), "ground_truth": False})
    # The model page's "Start Training": Label Studio posts START_TRAINING to our /webhook.
    stack.call("press Train", "POST", f"/api/ml/{stack.ml}/train", json={})
    deadline = time.time() + 300
    while True:
        detector = requests.get(f"{stack.backend.url}/health", timeout=5).json()["detector"]
        if detector.get("registry_version"):
            break
        log = stack.backend.log()
        assert "job" not in log or "failed" not in log.rsplit("START_TRAINING", 1)[-1], log[-3000:]
        assert time.time() < deadline, f"no new version after 300 s; backend log:\n{log[-3000:]}"
        time.sleep(1)
    after = requests.get(f"{stack.backend.url}/health", timeout=5).json()["model_version"]
    assert after != before
    answer = _retrieve(stack, "retrieve predictions from the new version")
    assert answer["processed_items"] == len(stack.scenes), answer
    ml = stack.call("read the ML backend after training", "GET", f"/api/ml/{stack.ml}").json()
    assert ml["model_version"] == after, ml
    fresh = [p for p in _predictions(stack) if p["model_version"] == after]
    assert Counter(p["task"] for p in fresh) == Counter(list(stack.scenes)), fresh
    boxes = [r for p in fresh for r in p["result"] if r["type"] == "rectanglelabels"]
    assert all(r["value"]["rectanglelabels"] == ["Disc"] and r["from_name"] == "box" for r in boxes), boxes
