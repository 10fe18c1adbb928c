"""Our backend inside a real Label Studio 1.23: connect it, pre-label every task through Label
Studio's own action, and answer a smart keypoint through Label Studio's interactive endpoint."""
from __future__ import annotations

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
