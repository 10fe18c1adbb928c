"""A cvat-sdk auto-annotation detection function around our YOLO backend.

    cvat-cli --server-host ... task auto-annotate TASK_ID \\
        --function-module labelassist.adapters.cvat.detector \\
        -p weights=str:/models/best.pt -p device=str:cpu [-p conf=float:0.25] [-p tta=str:]

What each model task becomes in CVAT (the label types declared in `spec`):

- detect: rectangles; obb: rectangles with `rotation`;
- segment: masks (CVAT's RLE, via cvat_sdk.masks.encode_mask), or polygons when CVAT asks for
  `conv_mask_to_poly`;
- pose: skeletons, one "points" element per keypoint, `outside` when the keypoint's confidence is
  under `keypoint_conf`;
- classify: a tag.

Every shape and tag carries our uncertainty (backends.uncertainty: the probability that the region
is wrong, calibrated when a `<weights stem>.calibration.json` lies beside the weights, else the
estimator's raw risk) as the number attribute "uncertainty", an integer 0..100; shapes also carry the
model's confidence as `score`. CVAT's `conf_threshold` is honoured: only regions with a confidence at
or above it come back (without one, the detector's own `conf`).

Parameters of `create` left out are taken from the labelassist settings (environment / .env):
YOLO_WEIGHTS (inside MODELS_DIR unless absolute), DEVICE, DETECT_CONF, UNCERTAINTY_TTA,
UNCERTAINTY_LOW_CONF.
"""
from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import cvat_sdk.auto_annotation as cvataa
import numpy as np
from cvat_sdk import models
from cvat_sdk.masks import encode_mask

from ...backends.detect import ModelLoadError, create_detector
from ...backends.types import Prediction, Region
from ...backends.uncertainty import UncertaintyEstimator, calibration_path
from .convert import (UNCERTAINTY, UNCERTAINTY_ID, UNCERTAINTY_VALUES, ModelLabels, image_array, instance_mask,
                      keypoints, rectangle, region_polygon, uncertainty_percent)

__all__ = ["DetectorFunction", "create", "label_specs", "load_estimator", "predict"]


# --- the backend, as CVAT calls it --------------------------------------------------------------

def load_estimator(weights: str | Path, device: str = "auto", conf: float = 0.25, iou: float = 0.7,
                   imgsz: int | None = None, tta: tuple[str, ...] = ("hflip", "scale0.8"),
                   low_conf: float = 0.05) -> UncertaintyEstimator:
    """The detector for `weights` in an UncertaintyEstimator; a calibration saved beside the weights
    (backends.uncertainty.calibration_path) is loaded with it, as the Label Studio adapter does."""
    detector = create_detector(weights, device, conf, iou, imgsz)
    saved = calibration_path(weights)
    if saved.is_file():
        try:
            fitted = json.loads(saved.read_text())
            # The views the calibration was fitted with, unless others are asked for.
            return UncertaintyEstimator.from_dict(detector, {**fitted, "tta": tta or fitted.get("tta", ())})
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"calibration file {saved.name} is unreadable: {exc}") from None
    return UncertaintyEstimator(detector, tta=tta, low_conf=low_conf)


class _AtThreshold:
    """The detector as the estimator sees it for one call: the same model with another serving
    threshold (the estimator keeps regions at or above the detector's `conf`)."""

    def __init__(self, detector, conf: float):
        self._detector = detector
        self.conf = float(conf)

    def predict(self, images, conf: float | None = None):
        return self._detector.predict(images, conf=self.conf if conf is None else conf)

    def __getattr__(self, name):
        if name == "_detector" or name.startswith("__"):  # not set yet (copying, pickling)
            raise AttributeError(name)
        return getattr(self._detector, name)


def predict(estimator: UncertaintyEstimator, image: np.ndarray, conf: float | None = None) -> Prediction:
    """Regions of one image at confidence >= `conf` (None: the detector's own threshold)."""
    detector = estimator.detector
    if conf is not None and float(conf) != float(detector.conf):
        estimator = UncertaintyEstimator(_AtThreshold(detector, conf), estimator.calibrator, estimator.tta,
                                         estimator.low_conf, estimator.miss_calibrator)
    return estimator.predict([image])[0]


# --- CVAT's spec and shapes ---------------------------------------------------------------------

def label_specs(labels: ModelLabels, with_uncertainty: bool = True) -> list[models.PatchedLabelRequest]:
    """One CVAT label per model class (id = class id), typed by the model's task; pose classes are
    skeletons whose sublabels are the keypoints (id = keypoint index)."""
    specs = []
    for class_id, name in sorted(labels.names.items()):
        attributes = ([cvataa.number_attribute_spec(UNCERTAINTY, UNCERTAINTY_ID, list(UNCERTAINTY_VALUES))]
                      if with_uncertainty else [])
        if labels.task == "pose":
            points = [cvataa.keypoint_spec(kp, j) for j, kp in enumerate(labels.keypoints[class_id])]
            specs.append(cvataa.skeleton_label_spec(name, class_id, points, attributes=attributes))
        else:
            specs.append(cvataa.label_spec(name, class_id, type=labels.label_type, attributes=attributes))
    return specs


class DetectorFunction:
    """cvat_sdk.auto_annotation.DetectionFunction for an UncertaintyEstimator around a detector."""

    def __init__(self, estimator: UncertaintyEstimator, keypoint_conf: float = 0.25,
                 polygon_tolerance: float = 1.0, with_uncertainty: bool = True):
        if not estimator.detector.trained:
            raise ValueError("the detector has no weights: pass -p weights=str:/path/to/model.pt "
                             "(or set YOLO_WEIGHTS)")
        self.estimator = estimator
        self.labels = ModelLabels.of(estimator.detector)
        self.keypoint_conf = float(keypoint_conf)
        self.polygon_tolerance = float(polygon_tolerance)
        self.with_uncertainty = bool(with_uncertainty)
        self._ids = {name: class_id for class_id, name in self.labels.names.items()}

    @cached_property
    def spec(self) -> cvataa.DetectionFunctionSpec:
        return cvataa.DetectionFunctionSpec(labels=label_specs(self.labels, self.with_uncertainty))

    def detect(self, context: cvataa.DetectionFunctionContext, image) -> list[cvataa.DetectionAnnotation]:
        array = image_array(image)
        prediction = predict(self.estimator, array, context.conf_threshold)
        out = []
        for region in prediction.regions:
            annotation = self.annotation(region, bool(context.conv_mask_to_poly), array.shape[:2])
            if annotation is not None:
                out.append(annotation)
        return out

    def annotation(self, region: Region, conv_mask_to_poly: bool,
                   image_size: tuple[int, int]) -> cvataa.DetectionAnnotation | None:
        """One region as a CVAT tag or shape (None when it has nothing CVAT can draw)."""
        label_id = int(region.extra.get("class_id", self._ids.get(region.label, -1)))
        common = {"attributes": self._attributes(region)}
        if region.kind == "class":
            return cvataa.tag(label_id, **common)
        common["score"] = float(np.clip(region.score, 0.0, 1.0))
        if region.kind == "box":
            points, rotation = rectangle(region)
            return cvataa.rectangle(label_id, points, rotation=rotation, **common)
        if region.kind == "keypoints":
            points = keypoints(region, self.keypoint_conf)
            if all(out for _, _, out in points):
                return None  # nothing the model is sure of
            elements = [cvataa.keypoint(j, [x, y], outside=out) for j, (x, y, out) in enumerate(points)]
            return cvataa.skeleton(label_id, elements, **common)
        if region.kind in ("polygon", "mask"):
            if conv_mask_to_poly:
                points = region_polygon(region, image_size, self.polygon_tolerance)
                return None if points is None else cvataa.polygon(label_id, points, **common)
            mask = instance_mask(region, image_size)
            return None if mask is None else cvataa.mask(label_id, encode_mask(mask), **common)
        return None

    def _attributes(self, region: Region) -> list[models.AttributeValRequest]:
        if not self.with_uncertainty:
            return []
        return [models.AttributeValRequest(spec_id=UNCERTAINTY_ID, value=uncertainty_percent(region.uncertainty))]


def create(weights: str | None = None, device: str | None = None, conf: float | None = None,
           iou: float = 0.7, imgsz: int | None = None, tta: str | None = None, low_conf: float | None = None,
           keypoint_conf: float = 0.25, polygon_tolerance: float | None = None,
           uncertainty: bool = True) -> DetectorFunction:
    """The function cvat-cli builds from `-p name=type:value` parameters.

    weights: a local ultralytics .pt file; device: auto, cpu, cuda, cuda:1 ...; conf: the threshold
    when CVAT gives none; iou: NMS IoU; imgsz: inference size (the model's own when left out);
    tta: comma-separated test-time views for the uncertainty ("" for none: one pass, faster);
    low_conf: lower bound for near-threshold candidates; keypoint_conf: keypoints under it are
    `outside`; polygon_tolerance: pixels of polygon simplification; uncertainty: false leaves the
    attribute out (for tasks whose labels do not declare it).
    """
    from ...settings import Settings

    settings = Settings()
    if weights:
        path = Path(weights).expanduser()
    elif settings.yolo_weights is not None:
        path = settings.yolo_weights if settings.yolo_weights.is_absolute() else settings.models_dir / settings.yolo_weights
    else:
        raise ValueError("no detector weights: pass -p weights=str:/path/to/model.pt (or set YOLO_WEIGHTS)")
    views = settings.uncertainty_tta if tta is None else tta
    estimator = load_estimator(
        path, device or settings.device, settings.detect_conf if conf is None else conf, iou, imgsz or None,
        tuple(v.strip() for v in views.split(",") if v.strip()),
        settings.uncertainty_low_conf if low_conf is None else low_conf)
    return DetectorFunction(estimator, keypoint_conf,
                            settings.polygon_tolerance if polygon_tolerance is None else polygon_tolerance,
                            uncertainty)
