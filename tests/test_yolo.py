"""YoloDetector (ultralytics) on tiny models trained here, from architecture files, on synthetic
scenes: nothing is downloaded, and a guard fails the module if anything tries the network."""
from __future__ import annotations

import math
import socket
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from labelassist.backends.detect import (ModelLoadError, YoloDetector, create_detector, rotated_box_corners,
                                         rotated_box_from_xywhr)
from labelassist.backends.detect.yolo import import_ultralytics
from labelassist.backends.image import to_rgb8
from synthetic_detection import CLASSES, KEYPOINT_NAMES, box_iou, make_detection_scene, match_detections
from tiny_models import train_tiny

_LOCAL = {"localhost", "127.0.0.1", "::1", None}


# --- no network ---------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def network_attempts():
    """Refuse and record every non-local name lookup or connection while this module runs."""
    attempts: list[str] = []
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, *args, **kwargs):
        if host not in _LOCAL:
            attempts.append(f"lookup {host}")
            raise OSError(f"network is off in test_yolo ({host})")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(sock, address, *args):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in _LOCAL:
            attempts.append(f"connect {address}")
            raise OSError(f"network is off in test_yolo ({address})")
        return real_connect(sock, address, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket, "getaddrinfo", getaddrinfo)
        mp.setattr(socket.socket, "connect", connect)
        yield attempts
    assert not attempts, f"ultralytics tried the network: {attempts}"


# --- training tiny models -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def scratch_weights(tmp_path_factory):
    """A checkpoint of a never-trained yolov8n (80 classes named "0".."79"), saved by ultralytics."""
    import_ultralytics()
    from ultralytics import YOLO

    path = tmp_path_factory.mktemp("yolo-scratch") / "scratch.pt"
    YOLO("yolov8n.yaml").save(path)
    return path


@pytest.fixture(scope="module")
def detect_weights(tmp_path_factory):
    """yolov8n from scratch, 20 epochs on 60 scenes at 160 px: about 50 s on 2 CPU cores."""
    weights, seconds = train_tiny(tmp_path_factory.mktemp("yolo-detect"), "yolov8n.yaml", "detect",
                                  epochs=20, imgsz=160, n_train=60)
    print(f"trained tiny detector in {seconds:.1f} s")
    return weights


@pytest.fixture(scope="module")
def detector(detect_weights):
    return YoloDetector.from_weights(detect_weights, device="cpu")


def _tiny_task_weights(tmp_path_factory, task: str, arch: str, epochs: int = 2) -> Path:
    size = 96 if task == "classify" else 128
    weights, _ = train_tiny(tmp_path_factory.mktemp(f"yolo-{task}"), arch, task, epochs=epochs, imgsz=size,
                            n_train=16)
    return weights


def _scene_images(seeds, size=(144, 208), mode="rgb"):
    scenes = [make_detection_scene(s, size, mode=mode) for s in seeds]
    return scenes, [s.image for s in scenes]


# --- no model, bad models -----------------------------------------------------------------------

def test_untrained_detector_answers_nothing():
    det = YoloDetector.untrained()
    assert det.trained is False and det.model_id == "yolo-untrained"
    images = [np.zeros((10, 20), np.uint8), np.zeros((5, 5, 3), np.uint8)]
    assert det.predict(images) == [[], []]
    assert det.candidates(images) == [[], []]
    assert det.predict([]) == []
    assert det.describe()["trained"] is False
    assert create_detector(None).trained is False


def test_missing_weights_raise_model_load_error(tmp_path):
    path = tmp_path / "nowhere" / "best.pt"
    with pytest.raises(ModelLoadError, match="best.pt"):
        YoloDetector.from_weights(path)
    with pytest.raises(ModelLoadError, match="best.pt"):
        create_detector(path)


def test_never_trained_checkpoint_loads_and_answers(scratch_weights):
    det = YoloDetector.from_weights(scratch_weights, device="cpu")
    assert det.trained and det.task == "detect" and len(det.class_names) == 80
    assert det.model_id.startswith("yolo-detect-")
    out = det.predict([np.zeros((48, 64), np.uint8), np.zeros((64, 48, 3), np.uint16)], conf=0.0001)
    assert len(out) == 2 and all(r.kind == "box" for regions in out for r in regions)


def test_bad_images_fail_before_running(scratch_weights):
    det = YoloDetector.from_weights(scratch_weights, device="cpu")
    with pytest.raises(ValueError):
        det.predict([np.zeros((20, 20, 3), np.uint8), np.zeros((20, 20, 2), np.uint8)])


def test_bad_weight_files_raise_model_load_error(tmp_path, scratch_weights):
    import torch

    good = scratch_weights.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good[: len(good) // 2])
    noise = tmp_path / "noise.pt"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    not_yolo = tmp_path / "state_dict.pt"
    torch.save({"weight": torch.zeros(3)}, not_yolo)
    other_format = tmp_path / "model.onnx"
    other_format.write_bytes(good)
    for path in (truncated, noise, empty, not_yolo, other_format):
        with pytest.raises(ModelLoadError, match=path.name):
            YoloDetector.from_weights(path, device="cpu")


class _Touch:
    """Unpickling this would create a file: what a malicious checkpoint could do."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_weights_that_would_run_code_are_refused_unrun(tmp_path):
    import torch

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": _Touch(marker)}, evil)
    with pytest.raises(ModelLoadError, match="evil.pt"):
        YoloDetector.from_weights(evil, device="cpu")
    assert not marker.exists()


def test_ultralytics_leaves_pil_and_opencv_alone():
    """Importing ultralytics patches PIL.Image.open (a non-image then tries to pip-install pi-heif
    and raises ModuleNotFoundError) and makes OpenCV single-threaded; the backend undoes both."""
    import io

    from PIL import Image, UnidentifiedImageError

    import_ultralytics()
    with pytest.raises(UnidentifiedImageError):
        Image.open(io.BytesIO(b"definitely not an image"))
    assert cv2.getNumThreads() >= 1


# --- rotated box convention (no model) ----------------------------------------------------------

def test_rotated_box_convention_matches_label_studio():
    # Unrotated: the box itself.
    assert rotated_box_from_xywhr(50, 40, 20, 10, 0.0) == pytest.approx((40, 35, 60, 45, 0.0))
    # A 90 degree clockwise turn of a 20 x 10 box centred at (50, 40): it stands 10 wide, 20 tall,
    # and its pre-rotation top-left corner is now its top-right one, (55, 30).
    geom = rotated_box_from_xywhr(50, 40, 20, 10, math.pi / 2)
    assert geom[4] == pytest.approx(90.0)
    corners = rotated_box_corners(geom)
    assert corners[0] == pytest.approx((55, 30))
    assert corners.min(0) == pytest.approx((45, 30)) and corners.max(0) == pytest.approx((55, 50))
    # Any angle: the corners' centre is the box centre, sides keep their lengths.
    for r in (0.3, 1.2, 2.5, -0.4):
        c = rotated_box_corners(rotated_box_from_xywhr(70, 60, 30, 12, r))
        assert c.mean(0) == pytest.approx((70, 60))
        assert np.linalg.norm(c[1] - c[0]) == pytest.approx(30)
        assert np.linalg.norm(c[3] - c[0]) == pytest.approx(12)
        assert 0 <= rotated_box_from_xywhr(70, 60, 30, 12, r)[4] < 360


# --- the trained detector (slow: training it takes about 45 s on 2 CPU cores) --------------------

@pytest.mark.slow
def test_loaded_detector_describes_itself(detector, detect_weights):
    assert detector.trained and detector.task == "detect"
    assert detector.class_names == dict(enumerate(CLASSES))
    assert detector.model_id.startswith("yolo-detect-") and len(detector.model_id) <= 32
    # The id follows the file's content, not its name or place.
    copy = detect_weights.parent / "copy.pt"
    copy.write_bytes(detect_weights.read_bytes())
    assert YoloDetector.from_weights(copy, device="cpu").model_id == detector.model_id


@pytest.mark.slow
def test_batch_gives_what_each_image_gives_alone(detector):
    _, images = _scene_images(range(500, 504))  # one size: the same letterbox alone and in a batch
    batch = detector.predict(images)
    assert len(batch) == len(images)
    for image, regions in zip(images, batch):
        alone = detector.predict([image])[0]
        assert [r.label for r in alone] == [r.label for r in regions]
        assert np.allclose(np.array([r.geometry for r in alone]).reshape(-1, 5),
                           np.array([r.geometry for r in regions]).reshape(-1, 5), atol=1e-3)


@pytest.mark.slow
def test_mixed_sizes_regions_in_order_and_in_bounds(detector):
    sizes = [(144, 208), (160, 160), (120, 250), (200, 130), (96, 96)]
    scenes = [make_detection_scene(600 + i, size) for i, size in enumerate(sizes)]
    batch = detector.predict([s.image for s in scenes])
    assert len(batch) == len(scenes)
    found = 0
    for scene, regions in zip(scenes, batch):
        h, w = scene.image.shape[:2]
        for r in regions:
            x0, y0, x1, y1, angle = r.geometry
            assert r.kind == "box" and angle == 0.0
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            assert r.label in CLASSES and r.extra["class_id"] == CLASSES.index(r.label)
            assert 0.25 <= r.score <= 1 and r.uncertainty == pytest.approx(1 - r.score)
            assert r.extra["above_threshold"] is True
            scores = r.extra["class_scores"]
            assert scores.shape == (3,) and scores.max() == pytest.approx(r.score, abs=1e-6)
            assert 0 <= r.extra["margin"] <= r.score
        # The regions belong to this image: they land on its own objects.
        if regions:
            iou = box_iou([r.geometry[:4] for r in regions], scene.boxes())
            found += int((iou.max(1) >= 0.5).sum())
    assert found >= 0.5 * sum(len(b) for b in batch) > 0


@pytest.mark.slow
def test_trained_detector_finds_the_objects(detector):
    scenes, images = _scene_images(range(2000, 2040), size=160)
    tp = n_pred = n_gt = 0
    for i in range(0, len(images), 10):
        for scene, regions in zip(scenes[i:i + 10], detector.predict(images[i:i + 10])):
            counts = match_detections(scene.boxes(), scene.classes(), [r.geometry[:4] for r in regions],
                                      [r.extra["class_id"] for r in regions])
            tp, n_pred, n_gt = tp + counts[0], n_pred + counts[1], n_gt + counts[2]
    recall, precision = tp / n_gt, tp / max(n_pred, 1)
    print(f"tiny detector on 40 new scenes: recall {recall:.2f}, precision {precision:.2f} at IoU 0.5")
    # Measured about 0.9 / 0.97; the bounds leave room for other CPUs and library versions.
    assert recall >= 0.5 and precision >= 0.7


def _ultralytics_boxes(weights: Path, image_rgb8: np.ndarray, conf: float) -> np.ndarray:
    import_ultralytics()
    from ultralytics import YOLO

    result = YOLO(str(weights)).predict(np.ascontiguousarray(image_rgb8[:, :, ::-1]), conf=conf, device="cpu",
                                        verbose=False)[0]
    return result.boxes.xyxy.numpy()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["rgb", "gray8", "gray16"])
def test_boxes_match_ultralytics_own_results(detector, detect_weights, mode):
    """Non-square images of every kind: our regions are ultralytics' boxes on the same BGR pixels,
    in pixels of the original image."""
    scene = make_detection_scene(77, (136, 232), mode=mode)
    conf = 0.1 if mode == "rgb" else 0.0005  # trained on colour only: it barely answers on gray
    regions = detector.predict([scene.image], conf=conf)[0]
    ours = np.array([r.geometry[:4] for r in regions]).reshape(-1, 4)
    theirs = _ultralytics_boxes(detect_weights, to_rgb8(scene.image), conf=conf)
    assert len(ours) == len(theirs) and len(ours) > 0
    assert np.allclose(np.sort(ours, 0), np.sort(theirs, 0), atol=1e-3)
    if mode == "rgb":  # colour order matters: the same pixels as RGB give other answers
        swapped = _ultralytics_boxes(detect_weights, scene.image[:, :, ::-1], conf=conf)
        assert len(swapped) != len(theirs) or not np.allclose(np.sort(swapped, 0), np.sort(theirs, 0), atol=1e-3)


@pytest.mark.slow
def test_candidates_add_near_threshold_regions(detector):
    _, images = _scene_images([3001, 3002])
    shown = detector.predict(images)
    near = detector.candidates(images, low_conf=0.01)
    for kept, cands in zip(shown, near):
        above = [r for r in cands if r.extra["above_threshold"]]
        below = [r for r in cands if not r.extra["above_threshold"]]
        assert len(above) == len(kept)
        assert all(0.01 <= r.score < detector.conf for r in below)
    assert sum(len(c) for c in near) > sum(len(k) for k in shown)


@pytest.mark.slow
def test_predict_is_thread_safe(detector):
    _, images = _scene_images(range(4000, 4006))
    expected = [detector.predict([im])[0] for im in images]
    out: dict[int, list] = {}

    def work(i):
        out[i] = detector.predict([images[i]])[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, regions in enumerate(expected):
        assert [(r.label, round(r.score, 4)) for r in out[i]] == [(r.label, round(r.score, 4)) for r in regions]




# --- the other tasks: barely trained, for the conversion paths ----------------------------------

@pytest.mark.slow
def test_segment_regions_are_polygons_with_full_size_masks(tmp_path_factory):
    weights = _tiny_task_weights(tmp_path_factory, "segment", "yolov8n-seg.yaml", epochs=3)
    det = YoloDetector.from_weights(weights, device="cpu", conf=0.001, max_det=20)
    assert det.task == "segment" and det.class_names == dict(enumerate(CLASSES))
    _, images = _scene_images([11, 12], size=(112, 176))
    batch = det.predict(images)
    assert sum(len(b) for b in batch) > 0
    for image, regions in zip(images, batch):
        h, w = image.shape[:2]
        for r in regions:
            assert r.kind == "polygon" and r.label in CLASSES
            poly, mask = r.geometry, r.extra["mask"]
            assert poly.ndim == 2 and poly.shape[1] == 2 and len(poly) >= 3
            assert mask.dtype == bool and mask.shape == (h, w) and mask.any()
            assert (poly >= 0).all() and (poly[:, 0] <= w).all() and (poly[:, 1] <= h).all()
            # The mask lies in the predicted box (ultralytics crops masks to it).
            ys, xs = np.nonzero(mask)
            x0, y0, x1, y1 = r.extra["box"]
            assert xs.min() >= x0 - 1.5 and xs.max() + 1 <= x1 + 1.5
            assert ys.min() >= y0 - 1.5 and ys.max() + 1 <= y1 + 1.5
            # The polygon outlines the mask's largest part.
            filled = np.zeros((h, w), np.uint8)
            cv2.fillPoly(filled, [np.round(poly - 0.5).astype(np.int32)], 1)
            largest = _largest_component(mask)
            inter = (filled.astype(bool) & largest).sum()
            assert inter / max(largest.sum(), 1) > 0.6


def _largest_component(mask: np.ndarray) -> np.ndarray:
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return mask
    return labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))


@pytest.mark.slow
def test_pose_regions_are_named_keypoints(tmp_path_factory):
    weights = _tiny_task_weights(tmp_path_factory, "pose", "yolov8n-pose.yaml")
    det = YoloDetector.from_weights(weights, device="cpu", conf=0.001, max_det=10)
    assert det.task == "pose"
    _, images = _scene_images([21, 22], mode="gray16")
    batch = det.predict(images)
    assert sum(len(b) for b in batch) > 0
    for regions in batch:
        for r in regions:
            assert r.kind == "keypoints" and r.label in CLASSES
            assert r.geometry.shape == (len(KEYPOINT_NAMES), 3)
            assert r.extra["keypoint_names"] == list(KEYPOINT_NAMES)
            assert len(r.extra["box"]) == 4 and "class_scores" in r.extra


@pytest.mark.slow
def test_obb_regions_follow_the_rotated_box_convention(tmp_path_factory):
    weights = _tiny_task_weights(tmp_path_factory, "obb", "yolov8n-obb.yaml")
    det = YoloDetector.from_weights(weights, device="cpu", conf=0.001, max_det=10)
    assert det.task == "obb"
    _, images = _scene_images([31])
    regions = det.predict(images)[0]
    assert regions
    for r in regions:
        assert r.kind == "box" and 0 <= r.geometry[4] < 360
        ours = rotated_box_corners(r.geometry)
        theirs = np.asarray(r.extra["corners"])
        # Same four corners (ultralytics may start the cycle elsewhere).
        d = np.linalg.norm(ours[:, None] - theirs[None], axis=2)
        assert d.min(1).max() < 1e-3
        x0, y0, x1, y1 = r.extra["bounds"]
        assert ours.min(0) == pytest.approx((x0, y0), abs=1e-3) and ours.max(0) == pytest.approx((x1, y1), abs=1e-3)


@pytest.mark.slow
def test_classify_regions_carry_probabilities(tmp_path_factory):
    weights = _tiny_task_weights(tmp_path_factory, "classify", "yolov8n-cls.yaml", epochs=1)
    det = YoloDetector.from_weights(weights, device="cpu")
    assert det.task == "classify" and sorted(det.class_names.values()) == sorted(CLASSES)
    _, images = _scene_images([41, 42], mode="gray8")
    batch = det.predict(images)
    for regions in batch:
        assert len(regions) == 1
        r = regions[0]
        assert r.kind == "class" and r.geometry is None and r.label in CLASSES
        probs = r.extra["probs"]
        assert probs.shape == (3,) and probs.sum() == pytest.approx(1, abs=1e-3)
        assert r.score == pytest.approx(probs.max()) and r.extra["margin"] >= 0


def test_no_network_was_tried(network_attempts):
    """Runs last: nothing above (training included) looked up or reached a remote host."""
    assert network_attempts == []
