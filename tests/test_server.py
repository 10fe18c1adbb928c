"""The Label Studio protocol over real HTTP: a threaded server on loopback, media from another one."""
from __future__ import annotations

import threading
import time

import cv2
import numpy as np
import pytest
import requests
from label_studio_sdk.converter.brush import decode_rle

from labelassist.adapters.label_studio.app import create_app
from labelassist.adapters.label_studio.media import MediaFetcher
from labelassist.adapters.label_studio.service import Service
from labelassist.backends.segment.grabcut import GrabCutSegmenter
from labelassist.backends.segment.sam import SamSegmenter
from labelassist.settings import Settings
from servers import png_bytes, serving, upload_server
from tiny_models import count_calls, tiny_sam

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="Coin"/><Label value="Cell"/></KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="Coin"/><Label value="Cell"/></RectangleLabels>
  <BrushLabels name="brush" toName="image"><Label value="Coin"/><Label value="Cell"/></BrushLabels>
  <PolygonLabels name="poly" toName="image"><Label value="Coin"/><Label value="Cell"/></PolygonLabels>
</View>"""
H, W = 240, 320
DISC = (200, 110, 50)  # cx, cy, r


def scene() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    img = np.full((H, W, 3), (90, 120, 90), np.uint8)
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    cv2.circle(img, DISC[:2], DISC[2], (220, 200, 60), -1)
    cv2.rectangle(img, (20, 20), (70, 60), (40, 40, 160), -1)  # clutter
    truth = np.zeros((H, W), np.uint8)
    cv2.circle(truth, DISC[:2], DISC[2], 1, -1)
    return img, truth.astype(bool)


IMAGE, TRUTH = scene()
FILES = {"1/coin.png": png_bytes(IMAGE), "1/text.png": b"this is not an image",
         # 300x300 of noise: few pixels, but a PNG of ~270 kB, over the byte limit used below
         "1/noise.png": png_bytes(np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)),
         "1/big.png": png_bytes(np.zeros((600, 600, 3), np.uint8))}


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.fixture(scope="module")
def media():
    with serving(upload_server(FILES, token="legacy-secret")) as url:
        yield url


def make_settings(media_url, tmp_path, **kw):
    return Settings(label_studio_url=media_url, label_studio_api_key="legacy-secret",
                    media_cache_dir=tmp_path / "media", max_image_pixels=200_000,
                    max_image_bytes=200_000, **kw)


@pytest.fixture()
def grabcut_server(media, tmp_path):
    settings = make_settings(media, tmp_path)
    service = Service(GrabCutSegmenter(), MediaFetcher(settings), 10**8)
    with serving(create_app(settings, service)) as url:
        yield url


@pytest.fixture()
def sam_server(media, tmp_path):
    seg = SamSegmenter(tiny_sam(), "sam-tiny", "cpu")
    calls = count_calls(seg.model.image_encoder)
    settings = make_settings(media, tmp_path)
    service = Service(seg, MediaFetcher(settings), 10**8)
    with serving(create_app(settings, service)) as url:
        yield url, calls


def task(name="1/coin.png", tid=1):
    return {"id": tid, "data": {"image": f"/data/upload/{name}"}}


def keypoint(x, y, positive=True, label="Coin", from_name="kp"):
    return {"from_name": from_name, "to_name": "image", "type": "keypointlabels", "is_positive": positive,
            "original_width": W, "original_height": H, "image_rotation": 0,
            "value": {"x": x * 100 / W, "y": y * 100 / H, "width": 0.5, "keypointlabels": [label]}}


def rectangle(x0, y0, x1, y1, label="Coin"):
    return {"from_name": "box", "to_name": "image", "type": "rectanglelabels",
            "original_width": W, "original_height": H, "image_rotation": 0,
            "value": {"x": x0 * 100 / W, "y": y0 * 100 / H, "width": (x1 - x0) * 100 / W,
                      "height": (y1 - y0) * 100 / H, "rotation": 0, "rectanglelabels": [label]}}


def click(url, context_result, tasks=None, config=CONFIG, **kw):
    body = {"tasks": tasks or [task()], "label_config": config, "project": "1.1700000000",
            "params": {"context": {"result": context_result}}}
    return requests.post(f"{url}/predict", json=body, timeout=30, **kw)


def decode_brush(result) -> np.ndarray:
    h, w = result["original_height"], result["original_width"]
    return decode_rle(result["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 127


def decode_polygon(result) -> np.ndarray:
    h, w = result["original_height"], result["original_width"]
    pts = np.array(result["value"]["points"]) * [w / 100, h / 100] - 0.5
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    return mask.astype(bool)


def test_health_setup_and_predict_share_model_version(grabcut_server):
    health = requests.get(f"{grabcut_server}/health", timeout=5)
    assert health.status_code == 200 and health.json()["status"] == "UP"
    assert requests.get(f"{grabcut_server}/", timeout=5).status_code == 200
    setup = requests.post(f"{grabcut_server}/setup", json={"project": "1", "schema": CONFIG}, timeout=5)
    version = setup.json()["model_version"]
    assert setup.status_code == 200 and version
    pred = click(grabcut_server, [keypoint(200, 110)]).json()["results"][0]
    assert pred["model_version"] == version


@pytest.mark.parametrize("prompt", ["point", "box", "box+negative"])
def test_click_returns_brush_and_polygon_for_the_object(grabcut_server, prompt):
    cx, cy, r = DISC
    context = {"point": [keypoint(cx, cy)],
               "box": [rectangle(cx - r - 4, cy - r - 4, cx + r + 4, cy + r + 4)],
               "box+negative": [rectangle(cx - r - 4, cy - r - 4, cx + r + 4, cy + r + 4),
                                keypoint(cx - r - 2, cy - r - 2, positive=False)]}[prompt]
    resp = click(grabcut_server, context)
    assert resp.status_code == 200, resp.text
    (pred,) = resp.json()["results"]
    by_type = {r["type"]: r for r in pred["result"]}
    assert set(by_type) == {"brushlabels", "polygonlabels"}
    brush, poly = by_type["brushlabels"], by_type["polygonlabels"]
    assert brush["from_name"] == "brush" and poly["from_name"] == "poly"
    assert brush["value"]["brushlabels"] == ["Coin"] and poly["value"]["polygonlabels"] == ["Coin"]
    assert (brush["original_width"], brush["original_height"]) == (W, H)
    assert iou(decode_brush(brush), TRUTH) > 0.85
    assert iou(decode_polygon(poly), TRUTH) > 0.85
    assert 0 < pred["score"] <= 1 and brush["score"] == pred["score"]


def test_only_controls_in_the_config_are_answered(grabcut_server):
    only_poly = CONFIG.replace('<BrushLabels name="brush" toName="image"><Label value="Coin"/><Label value="Cell"/></BrushLabels>', "")
    resp = click(grabcut_server, [keypoint(*DISC[:2])], config=only_poly)
    assert [r["type"] for r in resp.json()["results"][0]["result"]] == ["polygonlabels"]
    renamed = CONFIG.replace('name="brush"', 'name="my_masks"')
    resp = click(grabcut_server, [keypoint(*DISC[:2])], config=renamed)
    assert {r["from_name"] for r in resp.json()["results"][0]["result"]} == {"my_masks", "poly"}


def test_encoder_runs_once_for_many_clicks_over_http(sam_server):
    url, calls = sam_server
    for i in range(5):
        assert click(url, [keypoint(40 + 30 * i, 100)]).status_code == 200
    assert calls[0] == 1


def test_encoder_runs_once_under_concurrent_first_clicks_over_http(sam_server):
    url, calls = sam_server
    statuses = []
    barrier = threading.Barrier(6)

    def one(i):
        barrier.wait(5)
        statuses.append(click(url, [keypoint(40 + 30 * i, 100)]).status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert statuses == [200] * 6
    assert calls[0] == 1


def test_batch_predict_answers_every_task_in_order_and_warms_the_cache(sam_server):
    url, calls = sam_server
    tasks = [task(tid=7), task(tid=8)]
    resp = requests.post(f"{url}/predict", json={"tasks": tasks, "label_config": CONFIG}, timeout=10)
    assert resp.status_code == 200
    results = resp.json()["results"]
    assert len(results) == 2 and all(r["result"] == [] and r["model_version"] for r in results)
    deadline = time.time() + 20
    while calls[0] < 1 and time.time() < deadline:
        time.sleep(0.05)
    assert calls[0] == 1  # both tasks show the same image: one encode
    assert click(url, [keypoint(100, 100)], tasks=[task(tid=7)]).status_code == 200
    assert calls[0] == 1  # the click found the warm embedding


def test_tasks_created_webhook_warms_the_cache(sam_server):
    url, calls = sam_server
    body = {"action": "TASKS_CREATED", "project": {"id": 1, "label_config": CONFIG}, "tasks": [task(tid=3)]}
    resp = requests.post(f"{url}/webhook", json=body, timeout=10)
    assert resp.status_code == 200 and resp.json()["warming"] == 1
    deadline = time.time() + 20
    while calls[0] < 1 and time.time() < deadline:
        time.sleep(0.05)
    assert calls[0] == 1


def test_metrics_in_prometheus_text(sam_server):
    url, _ = sam_server
    click(url, [keypoint(100, 100)])
    click(url, [keypoint(120, 100)])
    text = requests.get(f"{url}/metrics", timeout=5).text
    assert 'labelassist_requests_total{route="/predict",status="200"} 2.0' in text
    assert "labelassist_embedding_cache_misses 1.0" in text
    assert 'labelassist_request_seconds_count{mode="interactive",route="/predict"} 2.0' in text


# --- bad input: a clear 4xx JSON error naming the problem, and the server keeps serving --------
def _bad_cases():
    ok_ctx = [keypoint(*DISC[:2])]
    return {
        "malformed json": (dict(data=b"{not json", headers={"Content-Type": "application/json"}), 400, "not valid JSON"),
        "body not an object": (dict(json=[1, 2]), 400, "JSON object"),
        "missing tasks": (dict(json={"label_config": CONFIG}), 400, "tasks"),
        "tasks not a list": (dict(json={"tasks": "x", "label_config": CONFIG}), 400, "list of task"),
        "missing label config": (dict(json={"tasks": [task()]}), 400, "label_config"),
        "broken label config": (dict(json={"tasks": [task()], "label_config": "<View><Image"}), 400, "label_config"),
        "unknown control": (dict(json={"tasks": [task()], "label_config": CONFIG,
                                       "params": {"context": {"result": [keypoint(50, 50, from_name="nope")]}}}),
                            400, "unknown control 'nope'"),
        "no usable prompt": (dict(json={"tasks": [task()], "label_config": CONFIG,
                                        "params": {"context": {"result": [keypoint(5, 5, positive=False)]}}}),
                             400, "no usable prompt"),
        "empty context result": (dict(json={"tasks": [task()], "label_config": CONFIG,
                                            "params": {"context": {"result": []}}}), 400, "no result regions"),
        "out of range": (dict(json={"tasks": [task()], "label_config": CONFIG,
                                    "params": {"context": {"result": [dict(keypoint(1, 1), value={"x": 140.0, "y": 5, "keypointlabels": ["Coin"]})]}}}),
                         400, "out of range"),
        "task without image": (dict(json={"tasks": [{"id": 1, "data": {}}], "label_config": CONFIG,
                                          "params": {"context": {"result": ok_ctx}}}), 400, "no image URL"),
        "image 404": (dict(json={"tasks": [task("1/missing.png")], "label_config": CONFIG,
                                 "params": {"context": {"result": ok_ctx}}}), 422, "404"),
        "not an image": (dict(json={"tasks": [task("1/text.png")], "label_config": CONFIG,
                                    "params": {"context": {"result": ok_ctx}}}), 422, "not an image"),
        "too many pixels": (dict(json={"tasks": [task("1/big.png")], "label_config": CONFIG,
                                       "params": {"context": {"result": ok_ctx}}}), 413, "pixels"),
        "too many bytes": (dict(json={"tasks": [task("1/noise.png")], "label_config": CONFIG,
                                      "params": {"context": {"result": ok_ctx}}}), 413, "bytes"),
        "body too large": (dict(data=b"{" + b" " * (2 * 1024 * 1024) + b"}",
                                headers={"Content-Type": "application/json"}), 413, "larger than the limit"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_gets_clear_4xx_json(media, tmp_path, case):
    kwargs, status, words = _bad_cases()[case]
    settings = make_settings(media, tmp_path, max_request_bytes=1024 * 1024)
    service = Service(GrabCutSegmenter(), MediaFetcher(settings), 10**8)
    with serving(create_app(settings, service)) as url:
        resp = requests.post(f"{url}/predict", timeout=30, **kwargs)
        assert resp.status_code == status, resp.text
        assert resp.headers["Content-Type"].startswith("application/json")
        assert words in resp.json()["error"]
        assert "Traceback" not in resp.text
        assert requests.get(f"{url}/health", timeout=5).status_code == 200


def test_image_401_is_a_clear_error_and_no_secret_leaks(media, tmp_path, caplog):
    settings = Settings(label_studio_url=media, label_studio_api_key="wrong-secret",
                        media_cache_dir=tmp_path / "m")
    service = Service(GrabCutSegmenter(), MediaFetcher(settings), 10**8)
    with serving(create_app(settings, service)) as url:
        resp = click(url, [keypoint(*DISC[:2])])
    assert resp.status_code == 422 and "401" in resp.json()["error"]
    assert "wrong-secret" not in resp.text and "wrong-secret" not in caplog.text


def test_basic_auth_on_every_route_but_health(media, tmp_path):
    settings = make_settings(media, tmp_path, basic_auth_user="ann", basic_auth_pass="s3cret")
    service = Service(GrabCutSegmenter(), MediaFetcher(settings), 10**8)
    with serving(create_app(settings, service)) as url:
        assert requests.get(f"{url}/health", timeout=5).status_code == 200
        denied = requests.post(f"{url}/setup", json={}, timeout=5)
        assert denied.status_code == 401 and "authentication" in denied.json()["error"]
        assert requests.get(f"{url}/metrics", timeout=5, auth=("ann", "nope")).status_code == 401
        assert requests.post(f"{url}/setup", json={}, timeout=5, auth=("ann", "s3cret")).status_code == 200
        assert click(url, [keypoint(*DISC[:2])], auth=("ann", "s3cret")).status_code == 200


def test_webhook_needs_an_action(grabcut_server):
    resp = requests.post(f"{grabcut_server}/webhook", json={"project": {}}, timeout=5)
    assert resp.status_code == 400 and "action" in resp.json()["error"]
    ok = requests.post(f"{grabcut_server}/webhook", json={"action": "PROJECT_UPDATED"}, timeout=5)
    assert ok.status_code == 200 and ok.json()["status"] == "ignored"
