"""The CVAT adapter's cvat-sdk functions, checked with CVAT's own code, no CVAT server.

- Functions are loaded the way `cvat-cli` loads them (its FunctionLoader, `-p` parameters included).
- Detector output goes through the SDK's own annotation mapper, the code `cvat-cli task auto-annotate`
  and the agents run on every frame before uploading: it checks label, sublabel and attribute ids,
  attribute values, shape types against the task's labels, skeleton elements and
  `conv_mask_to_poly`. The context is the SDK's own context type.
- Specs go through the agent's own dump and compatibility check (what `function create-native`
  registers and `run-agent` verifies).
- Masks are decoded with cvat_sdk.masks.decode_mask and compared with the backend's.

Models are real ultralytics architectures at toy size built from .yaml files (random weights,
nothing downloaded) for every task, and a tiny trained detector in the slow test.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import socket
from pathlib import Path

import attrs
import cvat_sdk.auto_annotation as cvataa
import numpy as np
import pytest
from cvat_cli._internal.agent import get_function_driver_class
from cvat_cli._internal.agent_driver_detection import AgentDetectionFunctionDriver
from cvat_cli._internal.agent_driver_interaction import (AgentInteractionFunctionDriver,
                                                         _InteractionFunctionContextImpl, _InteractionPromptsImpl)
from cvat_cli._internal.common import FunctionLoader
from cvat_sdk import models
from cvat_sdk.api_client import ApiClient
from cvat_sdk.auto_annotation.driver import _AnnotationMapper, _DetectionFunctionContextImpl
from cvat_sdk.masks import decode_mask
from PIL import Image

from labelassist.adapters.cvat import convert
from labelassist.adapters.cvat.detector import DetectorFunction, predict
from labelassist.adapters.cvat.interactor import InteractorFunction
from labelassist.backends.detect import ModelLoadError, rotated_box_corners
from labelassist.backends.detect.yolo import import_ultralytics
from labelassist.backends.segment.grabcut import GrabCutSegmenter
from labelassist.backends.types import Prompt, Region
from labelassist.backends.uncertainty import UncertaintyEstimator
from synthetic import interior_point, iou, jitter_box, make_scene, make_touching_pair
from synthetic_detection import CLASSES, KEYPOINT_NAMES, make_detection_scene, match_detections

DETECTOR = "labelassist.adapters.cvat.detector"
INTERACTOR = "labelassist.adapters.cvat.interactor"
TASKS = ("detect", "segment", "pose", "obb", "classify")
#: The CVAT label type each YOLO task should fill.
LABEL_TYPES = {"detect": "rectangle", "obb": "rectangle", "segment": "mask", "pose": "skeleton", "classify": "tag"}
_ARCHS = {"detect": "yolov8n.yaml", "segment": "yolov8n-seg.yaml", "pose": "yolov8n-pose.yaml",
          "obb": "yolov8n-obb.yaml", "classify": "yolov8n-cls.yaml"}


# --- tiny models, no network --------------------------------------------------------------------

def tiny_yolo(root: Path, task: str) -> Path:
    """A never-trained ultralytics model for `task` with our three classes (and, for pose, our three
    named keypoints), saved as a checkpoint: random weights from an architecture file."""
    import torch
    import yaml

    import_ultralytics()
    from ultralytics import YOLO
    from ultralytics.nn.tasks import yaml_model_load

    cfg = yaml_model_load(_ARCHS[task])
    cfg.pop("yaml_file", None)
    cfg["nc"] = len(CLASSES)
    if task == "pose":
        cfg["kpt_shape"] = [len(KEYPOINT_NAMES), 3]
    arch = root / f"tiny-{_ARCHS[task]}"
    arch.write_text(yaml.safe_dump(cfg))
    torch.manual_seed(0)
    model = YOLO(str(arch))
    model.model.names = dict(enumerate(CLASSES))
    if task == "pose":
        model.model.kpt_names = {i: list(KEYPOINT_NAMES) for i in range(len(CLASSES))}
    weights = root / f"tiny-{task}.pt"
    model.save(weights)
    return weights


@pytest.fixture(scope="module", autouse=True)
def offline():
    """Any name lookup or connection off the loopback fails the module (nothing is downloaded)."""
    tried = []
    real = socket.getaddrinfo

    def lookup(host, *args, **kwargs):
        if host not in ("localhost", "127.0.0.1", "::1", None):
            tried.append(host)
            raise OSError(f"no network in tests ({host})")
        return real(host, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket, "getaddrinfo", lookup)
        yield
    assert not tried, tried


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("cvat-yolo")
    return {task: tiny_yolo(root, task) for task in TASKS}


def load(path: Path, **params):
    """The detector function as cvat-cli builds it from `--function-module` and `-p` parameters."""
    params = {"weights": str(path), "device": "cpu", "imgsz": 160, "conf": 0.001, **params}
    return FunctionLoader(DETECTOR, None, params).load()


@pytest.fixture(scope="module")
def functions(weights):
    return {task: load(path) for task, path in weights.items()}


@pytest.fixture(scope="module")
def scene():
    return make_detection_scene(3, (144, 208))


# --- CVAT's side: a task's labels and the SDK's mapper ------------------------------------------

def task_labels(spec: cvataa.DetectionFunctionSpec, types: dict[str, str] | None = None) -> list[models.Label]:
    """The labels a CVAT task would have for this function: same names and the uncertainty attribute,
    with the server's own ids (not the function's), typed as `types` says (default: the spec's)."""
    out = []
    for i, label in enumerate(spec.labels):
        attributes = [models.Attribute._from_openapi_data(
            name=a.name, id=500 + 10 * i + a.id, input_type=a.input_type.value, values=list(a.values),
            mutable=False, default_value=a.values[0]) for a in getattr(label, "attributes", [])]
        sublabels = [models.Sublabel._from_openapi_data(name=s.name, id=300 + 10 * i + s.id, type="points",
                                                        attributes=[], has_parent=True)
                     for s in getattr(label, "sublabels", [])]
        kind = (types or {}).get(label.name, getattr(label, "type", "any"))
        out.append(models.Label._from_openapi_data(name=label.name, id=100 + label.id, type=kind,
                                                   attributes=attributes, sublabels=sublabels))
    return out


def run_like_cvat(function, image: np.ndarray, conf_threshold=None, conv_mask_to_poly=False, types=None):
    """detect() with the SDK's context type, then the SDK's validation and remapping, as
    `cvat-cli task auto-annotate` does per frame. Returns (tags, shapes, raw annotations)."""
    context = _DetectionFunctionContextImpl(frame_name="frame_000007.png", conf_threshold=conf_threshold,
                                            conv_mask_to_poly=conv_mask_to_poly)
    raw = function.detect(context, Image.fromarray(image))
    mapper = _AnnotationMapper(logging.getLogger("test"), function.spec.labels, task_labels(function.spec, types),
                               allow_unmatched_labels=False, conv_mask_to_poly=conv_mask_to_poly)
    # The mapper rewrites ids in place: it gets a copy, the function's own output stays for comparison.
    tags, shapes = mapper.validate_and_remap(copy.deepcopy(raw), 7)
    return tags, shapes, raw


# --- the spec -----------------------------------------------------------------------------------

@pytest.mark.parametrize("task", TASKS)
def test_spec_declares_the_model_labels_as_cvat_checks_them(functions, task):
    function = functions[task]
    spec = function.spec
    assert isinstance(spec, cvataa.DetectionFunctionSpec)  # built by the SDK's validating constructor
    assert [label.name for label in spec.labels] == list(CLASSES)
    assert [label.id for label in spec.labels] == [0, 1, 2]
    for label in spec.labels:
        assert label.type == LABEL_TYPES[task]
        [attribute] = label.attributes
        assert (attribute.name, attribute.input_type.value, attribute.values) == ("uncertainty", "number",
                                                                                  ["0", "100", "1"])
        if task == "pose":
            assert [(s.name, s.id, s.type) for s in label.sublabels] == [
                (name, j, "points") for j, name in enumerate(KEYPOINT_NAMES)]
    # What `cvat-cli function create-native` registers, and what `run-agent` checks against it.
    driver = get_function_driver_class(spec)
    assert driver is AgentDetectionFunctionDriver
    remote = json.loads(json.dumps(ApiClient.sanitize_for_serialization(driver.get_remote_function_fields(spec))))
    assert [label["name"] for label in remote["labels_v2"]] == list(CLASSES)
    driver(None, None, spec).validate_function_compatibility(remote)


def test_parameters_come_from_cvat_cli_and_missing_weights_are_clear(weights, tmp_path, monkeypatch):
    function = load(weights["detect"], conf=0.3, iou=0.5, tta="hflip", keypoint_conf=0.6, uncertainty=False)
    assert isinstance(function, DetectorFunction)
    det = function.estimator.detector
    assert (det.conf, det.iou, det.imgsz, det.device) == (0.3, 0.5, 160, "cpu")
    assert function.estimator.tta == ("hflip",) and function.keypoint_conf == 0.6
    assert all(not getattr(label, "attributes", []) for label in function.spec.labels)
    with pytest.raises(ModelLoadError, match="nowhere.pt"):
        load(tmp_path / "nowhere.pt")
    monkeypatch.chdir(tmp_path)  # no .env here
    monkeypatch.delenv("YOLO_WEIGHTS", raising=False)
    with pytest.raises(ValueError, match="weights=str:"):
        FunctionLoader(DETECTOR, None, {}).load()
    monkeypatch.setenv("YOLO_WEIGHTS", str(weights["obb"]))
    monkeypatch.setenv("DEVICE", "cpu")
    assert FunctionLoader(DETECTOR, None, {}).load().labels.task == "obb"


# --- detections through CVAT's validation -------------------------------------------------------

@pytest.mark.parametrize("conv_mask_to_poly", [False, True])
@pytest.mark.parametrize("task", TASKS)
def test_detections_pass_cvat_validation(functions, scene, task, conv_mask_to_poly):
    function = functions[task]
    image = scene.image
    types = ({name: "polygon" for name in CLASSES} if task == "segment" and conv_mask_to_poly else None)
    tags, shapes, raw = run_like_cvat(function, image, 0.0009, conv_mask_to_poly, types)
    h, w = image.shape[:2]
    regions = [r for r in predict(function.estimator, image, 0.0009).regions  # what the backend says
               if (r.kind != "keypoints" or (r.geometry[:, 2] >= 0.25).any())  # else nothing sure to draw
               and (r.kind != "polygon" or not conv_mask_to_poly or convert.region_polygon(r, (h, w)))]
    assert len(regions) > 0 and len(raw) == len(regions)
    out = tags if task == "classify" else shapes
    assert len(out) == len(regions) and (not tags or not shapes)
    for annotation, ann_raw, region in zip(out, raw, regions):
        # Remapped by CVAT's code onto the task's ids.
        assert annotation.label_id == 100 + CLASSES.index(region.label) and annotation.frame == 7
        [attribute] = annotation.attributes
        assert attribute.spec_id == 500 + 10 * CLASSES.index(region.label)
        assert attribute.value == str(round(region.uncertainty * 100)) and 0 <= int(attribute.value) <= 100
        if task == "classify":
            continue
        assert annotation.score == pytest.approx(region.score)
        kind = annotation.type.value
        if task in ("detect", "obb"):
            assert kind == "rectangle" and 0 <= annotation.rotation < 360
            xtl, ytl, xbr, ybr = annotation.points
            # CVAT rotates about the centre, clockwise: the same four corners as the backend's box.
            c, s = math.cos(math.radians(annotation.rotation)), math.sin(math.radians(annotation.rotation))
            cx, cy = (xtl + xbr) / 2, (ytl + ybr) / 2
            local = np.array([[xtl, ytl], [xbr, ytl], [xbr, ybr], [xtl, ybr]]) - (cx, cy)
            corners = local @ np.array([[c, -s], [s, c]]).T + (cx, cy)
            np.testing.assert_allclose(corners, rotated_box_corners(region.geometry), atol=1e-3)
            if task == "obb":
                d = np.linalg.norm(corners[:, None] - np.asarray(region.extra["corners"])[None], axis=2)
                assert d.min(axis=1).max() < 1e-2  # ultralytics' own corners
        elif task == "segment" and conv_mask_to_poly:
            assert kind == "polygon" and len(annotation.points) >= 6
            if len(region.geometry) >= 3:  # the detector's own outline
                np.testing.assert_allclose(annotation.points, np.asarray(region.geometry).ravel())
        elif task == "segment":
            assert kind == "mask"
            decoded = decode_mask(annotation.points, image_width=w, image_height=h)
            assert (decoded == region.extra["mask"]).all()  # CVAT's RLE round trip, exactly
        else:
            assert kind == "skeleton" and len(annotation.elements) == len(KEYPOINT_NAMES)
            base = 300 + 10 * CLASSES.index(region.label)
            for j, (element, (x, y, conf)) in enumerate(zip(annotation.elements, region.geometry)):
                assert element.label_id == base + j and element.type.value == "points"
                assert element.points == pytest.approx([x, y]) and element.outside == bool(conf < 0.25)


def test_cvat_refuses_masks_when_it_asked_for_polygons(functions, scene):
    """Why conv_mask_to_poly must be honoured: the SDK rejects masks it did not ask for."""
    _, shapes, _ = run_like_cvat(functions["segment"], scene.image, 0.002, conv_mask_to_poly=False)
    assert shapes and {s.type.value for s in shapes} == {"mask"}
    context = _DetectionFunctionContextImpl(frame_name="f.png", conf_threshold=0.002, conv_mask_to_poly=False)
    raw = functions["segment"].detect(context, Image.fromarray(scene.image))
    mapper = _AnnotationMapper(logging.getLogger("test"), functions["segment"].spec.labels,
                               task_labels(functions["segment"].spec, {n: "polygon" for n in CLASSES}),
                               allow_unmatched_labels=False, conv_mask_to_poly=True)
    with pytest.raises(cvataa.BadFunctionError, match="mask"):
        mapper.validate_and_remap(raw, 0)


@pytest.mark.parametrize("task", ["detect", "segment", "pose", "obb", "classify"])
def test_a_threshold_above_every_score_leaves_nothing(functions, scene, task):
    everything = run_like_cvat(functions[task], scene.image, 0.0009)[2]
    assert everything and all(getattr(a, "score", 1.0) >= 0.0009 for a in everything)
    assert run_like_cvat(functions[task], scene.image, 0.99)[2] == []


# --- conversions with known geometry ------------------------------------------------------------

class KnownDetector:
    """Answers every image with the given regions (a stand-in for YOLO with exact geometry)."""

    def __init__(self, task, regions):
        self.task, self.regions, self.trained, self.conf = task, regions, True, 0.25
        self.class_names, self.model_id = dict(enumerate(CLASSES)), "known"

    def predict(self, images, conf=None):
        return [[r for r in self.regions if r.score >= (self.conf if conf is None else conf)] for _ in images]


@pytest.mark.parametrize("conf_threshold,expected", [(None, [0.3, 0.5, 0.7, 0.9]), (0.05, [0.1, 0.3, 0.5, 0.7, 0.9]),
                                                     (0.5, [0.5, 0.7, 0.9]), (0.95, [])])
def test_conf_threshold_is_honoured(conf_threshold, expected):
    """CVAT's threshold replaces the detector's (0.25) for the call, in both directions."""
    regions = [Region(CLASSES[i % 3], "box", (10.0 * i, 5, 10.0 * i + 8, 20, 0.0), score, extra={"class_id": i % 3})
               for i, score in enumerate([0.1, 0.3, 0.5, 0.7, 0.9])]
    function = DetectorFunction(UncertaintyEstimator(KnownDetector("detect", regions), tta=()))
    tags, shapes, _ = run_like_cvat(function, np.zeros((30, 60, 3), np.uint8), conf_threshold)
    assert [round(s.score, 6) for s in shapes] == expected and not tags
    assert function.estimator.detector.conf == 0.25  # the call's threshold did not stick


@pytest.mark.parametrize("conf_threshold,tagged", [(None, True), (0.5, True), (0.85, False)])
def test_a_tag_only_above_the_threshold(conf_threshold, tagged):
    region = Region("square", "class", None, 0.8, extra={"class_id": 1, "margin": 0.7})
    function = DetectorFunction(UncertaintyEstimator(KnownDetector("classify", [region]), tta=()))
    tags, shapes, _ = run_like_cvat(function, np.zeros((8, 8), np.uint8), conf_threshold)
    assert not shapes and [t.label_id for t in tags] == ([101] if tagged else [])


def test_rotated_box_is_cvat_rectangle_rotated_about_its_centre():
    region = Region("disc", "box", (40.0, 30.0, 100.0, 50.0, 30.0), 0.9)
    points, rotation = convert.rectangle(region)
    assert rotation == 30.0
    assert points[2] - points[0] == pytest.approx(60) and points[3] - points[1] == pytest.approx(20)
    centre = rotated_box_corners(region.geometry).mean(axis=0)
    assert ((points[0] + points[2]) / 2, (points[1] + points[3]) / 2) == pytest.approx(tuple(centre))
    assert convert.rectangle(Region("disc", "box", (1, 2, 3, 4, 0.0))) == ([1, 2, 3, 4], 0.0)
    assert convert.rectangle(Region("disc", "box", (1, 2, 3, 4, 360.0))) == ([1, 2, 3, 4], 0.0)


def test_two_part_mask_round_trips_and_its_polygon_is_the_largest_part():
    mask = np.zeros((60, 90), bool)
    mask[5:30, 10:50] = True
    mask[40:55, 70:85] = True
    mask[12:18, 20:25] = False  # a hole
    outline = convert.outline(mask & (np.arange(90)[None] < 60))
    region = Region("square", "polygon", outline, 0.8, extra={"mask": mask, "class_id": 1})
    function = DetectorFunction(UncertaintyEstimator(KnownDetector("segment", [region]), tta=()))
    image = Image.fromarray(np.zeros((60, 90, 3), np.uint8))
    as_mask = function.detect(_DetectionFunctionContextImpl(frame_name="f", conv_mask_to_poly=False), image)
    as_poly = function.detect(_DetectionFunctionContextImpl(frame_name="f", conv_mask_to_poly=True), image)
    assert (decode_mask(as_mask[0].points, image_width=90, image_height=60) == mask).all()
    np.testing.assert_allclose(as_poly[0].points, outline.ravel())
    assert as_poly[0].points[:2] == [10.5, 5.5]  # pixel centres, like the detector's own polygons


def test_keypoints_under_keypoint_conf_are_outside_and_an_unsure_skeleton_is_dropped():
    sure = Region("triangle", "keypoints", np.array([[10, 10, 0.9], [20, 12, 0.1], [30, 15, 0.6]]), 0.9,
                  extra={"class_id": 2})
    unsure = Region("disc", "keypoints", np.array([[5, 5, 0.1], [6, 6, 0.2], [7, 7, 0.0]]), 0.8,
                    extra={"class_id": 0})
    detector = KnownDetector("pose", [sure, unsure])
    detector.keypoint_names_for = lambda class_id: list(KEYPOINT_NAMES)
    function = DetectorFunction(UncertaintyEstimator(detector, tta=()), keypoint_conf=0.5)
    [skeleton] = function.detect(_DetectionFunctionContextImpl(frame_name="f"), Image.new("RGB", (40, 30)))
    assert skeleton.label_id == 2
    assert [(e.label_id, e.points, e.outside) for e in skeleton.elements] == [
        (0, [10.0, 10.0], False), (1, [20.0, 12.0], True), (2, [30.0, 15.0], False)]


def test_gray_and_16_bit_images_reach_the_backend_unchanged():
    seen = []

    class Recorder(KnownDetector):
        def predict(self, images, conf=None):
            seen.extend(images)
            return super().predict(images, conf)

    function = DetectorFunction(UncertaintyEstimator(Recorder("detect", []), tta=()))
    gray16 = (np.arange(12 * 16, dtype=np.uint16).reshape(12, 16) * 300)
    for array in (gray16, gray16.astype(np.uint8), np.zeros((12, 16, 3), np.uint8)):
        seen.clear()
        function.detect(_DetectionFunctionContextImpl(frame_name="f"), Image.fromarray(array))
        assert seen[0].dtype == array.dtype and (seen[0] == array).all()


# --- the interactor -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def interactor():
    return FunctionLoader(INTERACTOR, None, {"segmenter": "grabcut"}).load()


def interact(function, pp_image, pos=(), neg=(), box=None):
    """One request as the agent makes it: its own prompt and context types; the agent sends
    `attrs.asdict` of each shape as JSON."""
    prompts = _InteractionPromptsImpl(pos_points=tuple(map(tuple, pos)), neg_points=tuple(map(tuple, neg)),
                                      bounding_box=None if box is None else ((box[0], box[1]), (box[2], box[3])))
    shapes = function.detect(_InteractionFunctionContextImpl(), pp_image, prompts)
    json.dumps([attrs.asdict(s) for s in shapes], default=lambda o: o.to_dict())
    return shapes


def test_interactor_spec_is_what_the_agent_registers(interactor):
    assert isinstance(interactor, InteractorFunction)
    assert isinstance(interactor.segmenter, GrabCutSegmenter)  # the weight-free default
    driver = get_function_driver_class(interactor.spec)
    assert driver is AgentInteractionFunctionDriver
    assert driver.get_remote_function_fields(interactor.spec) == {
        "min_pos_points": 0, "min_neg_points": 0, "startswith_box_optional": True}


@pytest.mark.parametrize("mode", ["rgb", "gray16"])
def test_a_click_or_a_box_gives_the_object(interactor, mode, monkeypatch):
    calls = []
    embed = interactor.segmenter.embed
    monkeypatch.setattr(interactor.segmenter, "embed", lambda image: calls.append(1) or embed(image))
    sc = make_scene(7, mode=mode)
    pil = Image.fromarray(sc.image)  # 16-bit gray arrives as PIL mode I;16
    pp = interactor.preprocess_image(_InteractionFunctionContextImpl(), pil)
    h, w = sc.image.shape[:2]
    rng = np.random.default_rng(0)
    clicks, boxes = [], []
    for obj in sc.objects:
        for shapes, ious in ((interact(interactor, pp, pos=[interior_point(obj.mask)]), clicks),
                             (interact(interactor, pp, box=jitter_box(obj.bbox, rng)), boxes)):
            [shape] = shapes
            assert shape.type == "mask"
            [confidence] = shape.attributes
            assert confidence.spec_id == cvataa.InteractionResultAttributes.CONFIDENCE
            assert 0.0 <= float(confidence.value) <= 1.0
            ious.append(iou(decode_mask(shape.points, image_width=w, image_height=h), obj.mask))
    assert len(calls) == 1  # one embedding for every prompt on the image
    assert np.mean(clicks) >= 0.85, np.round(clicks, 3)
    assert np.mean(boxes) >= 0.9, np.round(boxes, 3)


def test_negative_click_and_degenerate_prompts(interactor):
    sc = make_touching_pair(3, mode="rgb", intruder="object")
    target, other = sc.objects
    pp = interactor.preprocess_image(_InteractionFunctionContextImpl(), Image.fromarray(sc.image))
    [shape] = interact(interactor, pp, pos=[interior_point(target.mask)], neg=[interior_point(other.mask)])
    mask = decode_mask(shape.points, image_width=256, image_height=256)
    assert iou(mask, target.mask) >= 0.9 and (mask & other.mask).sum() <= 0.05 * other.area
    assert interact(interactor, pp) == []  # nothing asked
    assert interact(interactor, pp, neg=[(5, 5)]) == []  # only "not here"
    with pytest.raises(ValueError, match="no area"):
        interact(interactor, pp, box=(10, 10, 10, 40))
    # Without preprocess_image (the SDK allows it), the function embeds the PIL image itself.
    [again] = interact(interactor, Image.fromarray(sc.image), pos=[interior_point(target.mask)],
                       neg=[interior_point(other.mask)])
    assert again.points == shape.points


def test_sam_masks_reach_cvat_unchanged():
    from labelassist.backends.segment.sam import SamSegmenter
    from tiny_models import tiny_sam

    segmenter = SamSegmenter(tiny_sam(), "sam-tiny", "cpu")
    function = InteractorFunction(segmenter)
    image = np.random.default_rng(1).integers(0, 255, (90, 120, 3)).astype(np.uint8)
    pp = function.preprocess_image(_InteractionFunctionContextImpl(), Image.fromarray(image))
    assert pp.image_size == (90, 120)
    for pos, box in (([(60, 45)], None), ([], (20, 10, 100, 80)), ([(60, 45)], (20, 10, 100, 80))):
        expected = segmenter.segment(pp, Prompt(points=tuple(pos), positive=(True,) * len(pos), box=box))
        shapes = interact(function, pp, pos=pos, box=box)
        if not expected.geometry.any():
            assert shapes == []
            continue
        [shape] = shapes
        assert (decode_mask(shape.points, image_width=120, image_height=90) == expected.geometry).all()
        assert float(shape.attributes[0].value) == pytest.approx(expected.score, abs=1e-4)


def test_interactor_parameters_select_sam_and_missing_checkpoints_are_clear(tmp_path):
    from labelassist.backends.segment.sam import ModelLoadError as SamLoadError

    with pytest.raises(SamLoadError, match="not found"):
        FunctionLoader(INTERACTOR, None, {"segmenter": "sam", "sam_checkpoint": str(tmp_path / "sam.pth")}).load()
    with pytest.raises(ValueError, match="SAM_CHECKPOINT"):
        FunctionLoader(INTERACTOR, None, {"segmenter": "sam"}).load()


def test_interactor_loads_sam_from_a_local_checkpoint(tmp_path, monkeypatch):
    """cvat-cli's parameters reach SamSegmenter.from_checkpoint: a checkpoint file saved here
    (segment-anything's modules at toy size stand in for vit_b, whose builder is swapped)."""
    import segment_anything
    import torch
    from tiny_models import tiny_sam

    monkeypatch.setitem(segment_anything.sam_model_registry, "vit_b", lambda checkpoint=None: tiny_sam(seed=1))
    path = tmp_path / "sam_vit_b.pth"
    torch.save(tiny_sam(seed=0).state_dict(), path)
    function = FunctionLoader(INTERACTOR, None, {"sam_checkpoint": str(path), "sam_model_type": "vit_b",
                                                 "device": "cpu", "fp16_embeddings": False}).load()
    segmenter = function.segmenter
    assert segmenter.model_id.startswith("sam-vit_b-") and not segmenter.fp16_embeddings
    loaded, saved = segmenter.model.state_dict(), torch.load(path, weights_only=True)
    assert all(torch.equal(loaded[k].cpu(), saved[k]) for k in saved)  # the file's weights, not the builder's
    pp = function.preprocess_image(_InteractionFunctionContextImpl(), Image.new("RGB", (64, 48), "gray"))
    assert pp.image_size == (48, 64)


# --- slow: real models --------------------------------------------------------------------------

@pytest.mark.slow
def test_trained_detector_finds_the_objects_inside_cvat(tmp_path_factory):
    """A tiny detector trained here (about a minute on CPU) finds the objects of new scenes through
    the CVAT function (how well its uncertainty ranks mistakes is test_uncertainty's subject)."""
    from tiny_models import train_tiny

    weights, _ = train_tiny(tmp_path_factory.mktemp("cvat-trained"), "yolov8n.yaml", "detect",
                            epochs=20, imgsz=160, n_train=60)
    function = load(weights, conf=0.25, tta="hflip,scale0.8")
    tp = n_pred = n_gt = 0
    hits, misses = [], []
    for seed in range(3000, 3020):
        sc = make_detection_scene(seed, 160)
        _, shapes, _ = run_like_cvat(function, sc.image, conf_threshold=0.3)
        boxes = [s.points for s in shapes]
        classes = [s.label_id - 100 for s in shapes]
        counts = match_detections(sc.boxes(), sc.classes(), boxes, classes)
        tp, n_pred, n_gt = tp + counts[0], n_pred + counts[1], n_gt + counts[2]
        for box, cls, shape in zip(boxes, classes, shapes):
            good = match_detections(sc.boxes(), sc.classes(), [box], [cls])[0] == 1
            (hits if good else misses).append(int(shape.attributes[0].value))
        assert all(s.score >= 0.3 for s in shapes)
    recall, precision = tp / n_gt, tp / max(n_pred, 1)
    print(f"through CVAT: recall {recall:.2f}, precision {precision:.2f}; uncertainty on hits "
          f"{np.mean(hits):.1f}, on mistakes {np.mean(misses) if misses else float('nan'):.1f}")
    assert recall >= 0.5 and precision >= 0.7
    assert all(0 <= u <= 100 for u in hits + misses)
