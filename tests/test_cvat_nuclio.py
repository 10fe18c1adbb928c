"""The nuclio functions for self-hosted CVAT, run under nuclio-sdk's own test platform.

Handlers are loaded from their folders (adapters/cvat/nuclio/<name>/main.py, as nuclio loads them),
configured through the environment as function.yaml configures them, and called with the request
bodies CVAT sends (base64 image, threshold; pos_points, neg_points, obj_bbox), decoded the way the
nuclio processor hands them over. Answers are serialised the way the processor serialises them and
read back the way CVAT's server reads them (detector masks are RLE-encoded exactly as CVAT does).
"""
from __future__ import annotations

import base64
import importlib.util
import io
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import nuclio_sdk
import pytest
import yaml
from cvat_sdk.masks import encode_mask
from nuclio_sdk.test import Platform
from PIL import Image

from labelassist.adapters.cvat import convert, serverless
from labelassist.adapters.cvat.detector import create, predict
from labelassist.backends.segment.grabcut import GrabCutSegmenter
from labelassist.backends.segment.sam import ModelLoadError as SamLoadError
from labelassist.settings import Settings
from synthetic import interior_point, iou, jitter_box, make_scene, make_touching_pair
from synthetic_detection import CLASSES, KEYPOINT_NAMES, make_detection_scene
from test_cvat import LABEL_TYPES, TASKS, tiny_yolo

NUCLIO = Path(__file__).resolve().parent.parent / "adapters" / "cvat" / "nuclio"


# --- nuclio's side ------------------------------------------------------------------------------

def load_main(name: str, tag: str):
    """A function's main.py as nuclio's python wrapper imports it (one module per deployment)."""
    spec = importlib.util.spec_from_file_location(f"nuclio_{name}_{tag}_main", NUCLIO / name / "main.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def request(payload, parsed: bool = True):
    """The event the processor gives the handler for an HTTP POST of JSON: decoded by nuclio-sdk's own
    msgpack event deserializer (content type application/json: the body arrives parsed), or with the
    raw body when `parsed` is False."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    if not parsed:
        return nuclio_sdk.Event(body=body, content_type="application/octet-stream", method="POST")
    message = {"body": body, "content_type": "application/json", "trigger": {"kind": "http", "name": "myHttpTrigger"},
               "fields": {}, "headers": {"Content-Type": "application/json"}, "id": "1", "method": "POST",
               "path": "/", "size": len(body), "timestamp": 0, "url": "", "shard_id": 0, "num_shards": 0,
               "type": "", "type_version": "", "version": ""}
    return nuclio_sdk.EventDeserializerKinds.msgpack.value.deserialize(message)


def call(platform: Platform, module, payload, parsed: bool = True) -> tuple[int, object]:
    """(status, JSON) of the answer as the processor writes it to the wire."""
    response = platform.call_handler(module.handler, request(payload, parsed))
    wire = nuclio_sdk.Response.from_entrypoint_output(json.dumps, response)
    assert wire["content_type"] == "application/json" and wire["body_encoding"] == "text"
    return wire["status_code"], json.loads(wire["body"])


def b64_png(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("nuclio-yolo")
    return {task: tiny_yolo(root, task) for task in TASKS}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The environment function.yaml gives a deployment; run from a folder without a .env file."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("nuclio-cwd"))
        yield mp


@pytest.fixture(scope="module")
def deployed(weights, env):
    """One initialised detector deployment per task (nuclio calls init_context on the first event)."""
    out = {}
    for task in TASKS:
        env.setenv("YOLO_WEIGHTS", str(weights[task]))
        env.setenv("DEVICE", "cpu")
        env.setenv("DETECT_CONF", "0.001")
        env.setenv("UNCERTAINTY_TTA", "hflip")
        platform, module = Platform(), load_main("detector", task)
        status, answer = call(platform, module, {"image": b64_png(np.zeros((32, 32, 3), np.uint8)), "threshold": 0.99})
        assert (status, answer) == (200, [])
        out[task] = (platform, module)
    return out


@pytest.fixture(scope="module")
def interactor(env):
    env.setenv("SEGMENTER", "grabcut")
    env.delenv("SAM_CHECKPOINT", raising=False)
    platform, module = Platform(), load_main("interactor", "grabcut")
    return platform, module


def server_rle(bits) -> list[int]:
    """CVAT's server turns a detector's "mask" bitmap into RLE (datumaro's mask_to_rle on the flat
    list): lengths of alternating runs, starting with a run of zeros."""
    bits = np.asarray(bits, dtype=np.uint8)
    edges = np.flatnonzero(np.diff(bits)) + 1
    runs = np.diff(np.concatenate([[0], edges, [len(bits)]])).tolist()
    return ([0] if bits[0] else []) + runs


# --- function.yaml ------------------------------------------------------------------------------

def _yaml(name: str) -> dict:
    return yaml.safe_load((NUCLIO / name / "function.yaml").read_text())


def check_cvat_spec(spec: list[dict]) -> None:
    """What CVAT's lambda manager requires of a detector's spec annotation."""
    names = [label["name"] for label in spec]
    assert len(names) == len(set(names)), "CVAT refuses functions with non-unique labels"
    for label in spec:
        assert label.get("type", "unknown") in {"rectangle", "mask", "polygon", "skeleton", "tag", "points"}
        attribute_names = [a["name"] for a in label.get("attributes", [])]
        assert len(attribute_names) == len(set(attribute_names))
        for attribute in label.get("attributes", []):
            assert {"name", "input_type", "values"} <= set(attribute)
        if label.get("type") == "skeleton":
            sublabels = [s["name"] for s in label["sublabels"]]
            assert all(s["type"] == "points" for s in label["sublabels"])
            # The drawing names each sublabel, in order, with node ids 1..n.
            for i, name in enumerate(sublabels, start=1):
                assert f'data-node-id="{i}" data-label-name="{name}"' in label["svg"]


@pytest.mark.parametrize("name,kind", [("detector", "detector"), ("interactor", "interactor")])
def test_function_yaml_is_what_cvat_and_nuclio_read(name, kind):
    config = _yaml(name)
    annotations = config["metadata"]["annotations"]
    assert annotations["type"] == kind and config["metadata"]["namespace"] == "cvat"
    spec = config["spec"]
    assert spec["handler"] == "main:handler" and spec["runtime"].startswith("python:3")
    assert spec["build"]["baseImage"] == "labelassist-cvat:latest"
    assert spec["triggers"]["myHttpTrigger"]["kind"] == "http"
    # Every variable set there is a labelassist setting (a typo would be silently ignored).
    for variable in spec["env"]:
        assert variable["name"].lower() in Settings.model_fields, variable["name"]
    mounts = [v["volumeMount"]["mountPath"] for v in spec["volumes"]]
    main = load_main(name, "yaml")
    assert callable(main.init_context) and callable(main.handler)
    if kind == "detector":
        labels = json.loads(annotations["spec"])
        check_cvat_spec(labels)
        import ultralytics

        coco = yaml.safe_load((Path(ultralytics.__file__).parent / "cfg" / "datasets" / "coco.yaml").read_text())
        assert [label["name"] for label in labels] == [coco["names"][i] for i in range(80)]
        weights = next(v["value"] for v in spec["env"] if v["name"] == "YOLO_WEIGHTS")
        assert any(weights.startswith(m + "/") for m in mounts)
    else:
        assert annotations["version"] == 2  # masks, not polygons, in the answer
        assert (annotations["min_pos_points"], annotations["min_neg_points"]) == (0, 0)
        assert annotations["startswith_box_optional"] is True


@pytest.mark.parametrize("task", TASKS)
def test_spec_command_writes_the_model_labels_into_function_yaml(weights, task, tmp_path, capsys):
    target = tmp_path / "function.yaml"
    shipped = (NUCLIO / "detector" / "function.yaml").read_text()
    target.write_text(shipped)
    assert serverless.main(["spec", str(weights[task]), "--write", str(target)]) == 0
    written = yaml.safe_load(target.read_text())
    labels = json.loads(written["metadata"]["annotations"]["spec"])
    check_cvat_spec(labels)
    assert [(label["id"], label["name"]) for label in labels] == list(enumerate(CLASSES))
    assert {label["type"] for label in labels} == {LABEL_TYPES[task]}
    assert all(label["attributes"] == [{"name": "uncertainty", "input_type": "number", "values": ["0", "100", "1"]}]
               for label in labels)
    if task == "pose":
        assert all([s["name"] for s in label["sublabels"]] == list(KEYPOINT_NAMES) for label in labels)
    # Everything but the spec is left as it was, comments included.
    original = yaml.safe_load(shipped)
    original["metadata"]["annotations"].pop("spec")
    written["metadata"]["annotations"].pop("spec")
    assert written == original
    kept = [line for line in shipped.splitlines() if line.startswith("#")]
    assert kept and kept == [line for line in target.read_text().splitlines() if line.startswith("#")]
    # Without --write, the spec is printed.
    assert serverless.main(["spec", str(weights[task]), "--no-uncertainty"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [label["name"] for label in printed] == list(CLASSES) and all(not p["attributes"] for p in printed)


# --- the detector -------------------------------------------------------------------------------

@pytest.mark.parametrize("task", TASKS)
def test_detector_answers_what_cvat_reads(deployed, weights, task):
    platform, module = deployed[task]
    image = make_detection_scene(3, (144, 208)).image
    status, shapes = call(platform, module, {"image": b64_png(image), "threshold": 0.0009})
    assert status == 200 and shapes
    # The same backend call, made directly: the handler only converted formats.
    function = create(weights=str(weights[task]), device="cpu", conf=0.001, tta="hflip")
    regions = [r for r in predict(function.estimator, image, 0.0009).regions
               if r.kind != "keypoints" or (r.geometry[:, 2] >= 0.25).any()]
    assert len(shapes) == len(regions)
    h, w = image.shape[:2]
    for shape, region in zip(shapes, regions):
        assert shape["label"] == region.label and shape["label"] in CLASSES
        assert float(shape["confidence"]) == pytest.approx(region.score, abs=1e-4)
        assert shape["attributes"] == [{"name": "uncertainty", "value": convert.uncertainty_percent(region.uncertainty)}]
        assert shape["attributes"][0]["value"].isnumeric()  # what CVAT checks of number attributes
        kind = shape["type"]
        if task == "classify":
            assert kind == "tag"
        elif task in ("detect", "obb"):
            assert kind == "rectangle"
            points, rotation = convert.rectangle(region)
            assert shape["points"] == pytest.approx(points) and shape["rotation"] == pytest.approx(rotation)
            assert 0 <= shape["rotation"] < 360
        elif task == "segment":
            assert kind == "mask"
            *bits, x0, y0, x1, y1 = shape["mask"]
            assert set(bits) <= {0, 1} and len(bits) == (x1 - x0 + 1) * (y1 - y0 + 1)
            full = np.zeros((h, w), bool)
            full[y0:y1 + 1, x0:x1 + 1] = np.reshape(bits, (y1 - y0 + 1, x1 - x0 + 1)).astype(bool)
            assert (full == region.extra["mask"]).all()
            # CVAT's server RLE of this bitmap is cvat-sdk's encoding of the same mask.
            assert server_rle(bits) + [x0, y0, x1, y1] == encode_mask(region.extra["mask"])
            # With "convert masks to polygons", CVAT takes "points": the backend's outline.
            if len(region.geometry) >= 3:
                np.testing.assert_allclose(shape["points"], np.asarray(region.geometry).ravel())
            else:  # the detector's outline is no polygon: the mask's, if it has one
                assert len(shape.get("points", [0] * 6)) >= 6
        else:
            assert kind == "skeleton"
            assert [e["label"] for e in shape["elements"]] == list(KEYPOINT_NAMES)
            for element, (x, y, conf) in zip(shape["elements"], region.geometry):
                assert element["type"] == "points" and element["points"] == pytest.approx([x, y])
                assert element["outside"] == bool(conf < 0.25)


def test_detector_threshold_and_bad_requests(deployed, monkeypatch):
    platform, module = deployed["detect"]
    image = b64_png(make_detection_scene(4, (96, 128)).image)
    status, everything = call(platform, module, {"image": image})  # no threshold: DETECT_CONF
    assert status == 200 and everything and all(float(s["confidence"]) >= 0.001 for s in everything)
    assert call(platform, module, {"image": image, "threshold": 0.99}) == (200, [])
    assert call(platform, module, {"image": image, "threshold": "0.99"}) == (200, [])  # as a form would send it
    # The raw body (no JSON content type) is parsed too.
    assert call(platform, module, {"image": image}, parsed=False) == (200, everything)
    for payload, status in [({"image": image, "threshold": 2}, 400), ({"image": image, "threshold": "high"}, 400),
                            ({}, 400), ({"image": "not base64!"}, 400),
                            ({"image": base64.b64encode(b"GIF89a but not really").decode()}, 422),
                            ([1, 2], 400), (b"\x89PNG not json", 400)]:
        got, answer = call(platform, module, payload, parsed=not isinstance(payload, bytes))
        assert got == status and set(answer) == {"error"}, (payload, answer)
    # A failure inside: a 500 with no traceback.
    monkeypatch.setattr(serverless, "decode_image", lambda *a: 1 / 0)
    assert call(platform, module, {"image": image}) == (500, {"error": "internal error"})


# --- the interactor -----------------------------------------------------------------------------

def full_mask(answer: dict, shape: tuple[int, int]) -> np.ndarray:
    """The interactor's answer as CVAT's UI reads it: the mask rows placed at their bounds."""
    x0, y0, x1, y1 = answer["bounds"]
    crop = np.asarray(answer["mask"], dtype=np.uint8)
    assert crop.shape == (y1 - y0 + 1, x1 - x0 + 1) and set(np.unique(crop)) <= {0, 255}
    out = np.zeros(shape, bool)
    out[y0:y1 + 1, x0:x1 + 1] = crop > 0
    return out


def filled(points: list, shape: tuple[int, int]) -> np.ndarray:
    canvas = np.zeros(shape, np.uint8)
    cv2.fillPoly(canvas, [np.round(np.asarray(points) - 0.5).astype(np.int32)], 1)
    return canvas.astype(bool)


@pytest.mark.parametrize("mode", ["rgb", "gray16"])
def test_interactor_clicks_and_boxes_give_the_object(interactor, mode, monkeypatch):
    platform, module = interactor
    embeds = []
    original = GrabCutSegmenter.embed
    monkeypatch.setattr(GrabCutSegmenter, "embed", lambda self, image: embeds.append(image.dtype) or original(self, image))
    sc = make_scene(11, mode=mode)
    image = b64_png(sc.image)  # 16-bit gray stays a 16-bit PNG
    shape = sc.image.shape[:2]
    rng = np.random.default_rng(0)
    clicks, boxes, outlines = [], [], []
    for obj in sc.objects:
        x, y = interior_point(obj.mask)
        status, answer = call(platform, module, {"image": image, "pos_points": [[x, y]], "neg_points": []})
        assert status == 200 and 0 <= float(answer["confidence"]) <= 1
        clicks.append(iou(full_mask(answer, shape), obj.mask))
        outlines.append(iou(filled(answer["points"], shape), full_mask(answer, shape)))
        x0, y0, x1, y1 = jitter_box(obj.bbox, rng)
        status, answer = call(platform, module, {"image": image, "pos_points": [], "neg_points": [],
                                                 "obj_bbox": [[x0, y0], [x1, y1]]})
        boxes.append(iou(full_mask(answer, shape), obj.mask))
    assert np.mean(clicks) >= 0.85, np.round(clicks, 3)
    assert np.mean(boxes) >= 0.9, np.round(boxes, 3)
    assert np.mean(outlines) >= 0.9, np.round(outlines, 3)  # "points" outlines the mask
    # The embedding is computed once for the image, whatever the number of clicks; at the image's depth.
    assert embeds == [np.uint16 if mode == "gray16" else np.uint8]


def test_interactor_negative_points_empty_prompts_and_bad_requests(interactor):
    platform, module = interactor
    sc = make_touching_pair(3, mode="rgb", intruder="object")
    target, other = sc.objects
    image = b64_png(sc.image)
    status, answer = call(platform, module, {"image": image, "pos_points": [interior_point(target.mask)],
                                             "neg_points": [interior_point(other.mask)], "obj_bbox": None})
    mask = full_mask(answer, (256, 256))
    assert status == 200 and iou(mask, target.mask) >= 0.9 and (mask & other.mask).sum() <= 0.05 * other.area
    # Only "not here": nothing to draw, and CVAT's UI can read it.
    status, answer = call(platform, module, {"image": image, "pos_points": [], "neg_points": [[5, 5]]})
    assert status == 200 and answer["points"] == [] and not full_mask(answer, (256, 256)).any()
    for payload in [{"image": image, "pos_points": [["a", 1]], "neg_points": []},
                    {"image": image, "pos_points": [[1, 2, 3]], "neg_points": []},
                    {"image": image, "pos_points": [], "neg_points": [], "obj_bbox": [[10, 10], [10, 50]]},
                    {"pos_points": [[1, 1]], "neg_points": []}]:
        status, answer = call(platform, module, payload)
        assert status == 400 and set(answer) == {"error"}, (payload, answer)


def test_interactor_limits_come_from_the_settings(env, monkeypatch):
    monkeypatch.setenv("SEGMENTER", "grabcut")
    monkeypatch.setenv("MAX_IMAGE_PIXELS", "1000")
    platform, module = Platform(), load_main("interactor", "small")
    status, answer = call(platform, module, {"image": b64_png(np.zeros((40, 40, 3), np.uint8)),
                                             "pos_points": [[5, 5]], "neg_points": []})
    assert status == 413 and "1000" in answer["error"]


def test_sam_without_its_checkpoint_fails_at_start(env, monkeypatch, tmp_path):
    monkeypatch.setenv("SEGMENTER", "sam")
    monkeypatch.setenv("SAM_CHECKPOINT", str(tmp_path / "sam_vit_b.pth"))
    platform, module = Platform(), load_main("interactor", "sam")
    with pytest.raises(SamLoadError, match="not found"):
        call(platform, module, {"image": b64_png(np.zeros((8, 8, 3), np.uint8)), "pos_points": [[1, 1]],
                                "neg_points": []})


def test_detector_without_weights_fails_at_start(env, monkeypatch):
    monkeypatch.delenv("YOLO_WEIGHTS", raising=False)
    platform, module = Platform(), load_main("detector", "none")
    with pytest.raises(ValueError, match="YOLO_WEIGHTS"):
        call(platform, module, {"image": b64_png(np.zeros((8, 8, 3), np.uint8))})
