"""Batch pre-labels: every image control the configured detectors can fill, for many tasks at once.

A "model" here is a backends.uncertainty.UncertaintyEstimator around a detector: `predict(images)`
gives one Prediction per image (regions with calibrated uncertainty, and the image's difficulty).

Which detector fills a control: the control's own `model_path` attribute (a weights file inside
MODELS_DIR), else the default YOLO_WEIGHTS. A control is filled only when its type fits the
model's task (boxes -> RectangleLabels, instance masks -> PolygonLabels/BrushLabels, keypoints ->
KeyPointLabels, classes -> Choices) and only with model classes that map to its labels.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ...backends.types import Prediction
from ...backends.uncertainty import combine_difficulty
from ..errors import ApiError
from .config import Control, ParsedConfig
from .results import detection_results

log = logging.getLogger(__name__)

#: Control tags each detector task can fill.
TASK_OUTPUTS = {
    "detect": ("RectangleLabels", "Rectangle"),
    "obb": ("RectangleLabels", "Rectangle"),
    "segment": ("PolygonLabels", "Polygon", "BrushLabels", "Brush"),
    "pose": ("KeyPointLabels", "KeyPoint"),
    "classify": ("Choices",),
}


@dataclass(frozen=True)
class Target:
    control: Control
    image: str  # the Image object name
    model: object  # UncertaintyEstimator

    @property
    def detector(self):
        return self.model.detector


def resolve_model_path(models_dir: Path, value: str | Path) -> Path:
    """A weights path inside `models_dir` (relative paths are taken from it); anything else is 400."""
    root = Path(models_dir).resolve()
    candidate = Path(value)
    path = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if path != root and root not in path.parents:
        raise ApiError(400, f"model_path {str(value)!r} is outside the models folder (MODELS_DIR)")
    return path


class Prelabeler:
    def __init__(self, default_model, models_dir: Path, load: Callable[[Path], object],
                 polygon_tolerance: float = 1.0, batch: int = 16):
        self.default = default_model
        self.models_dir = models_dir
        self._load = load
        self._loaded: dict[Path, object] = {}
        self._lock = threading.Lock()
        self.polygon_tolerance = polygon_tolerance
        self.batch = batch

    def model_for(self, control: Control):
        value = control.attr("model_path")
        if not value:
            return self.default
        path = resolve_model_path(self.models_dir, value)
        with self._lock:
            if path not in self._loaded:
                try:
                    self._loaded[path] = self._load(path)
                except Exception as exc:  # missing or corrupt weights: the request is at fault
                    raise ApiError(400, f"control {control.name!r}: cannot load model_path {value!r}: "
                                        f"{getattr(exc, 'args', [exc])[0]}") from None
            return self._loaded[path]

    def targets(self, config: ParsedConfig) -> list[Target]:
        out = []
        for control in config.controls.values():
            if control.tag not in _ALL_OUTPUTS and not control.attr("model_path"):
                continue
            model = self.model_for(control)
            detector = model.detector
            if not detector.trained:
                continue
            explicit = control.attr("model_path")
            if control.tag not in TASK_OUTPUTS.get(detector.task, ()):
                if explicit:
                    raise ApiError(400, f"control {control.name!r} is a {control.tag}, which a {detector.task} "
                                        f"model ({explicit}) cannot fill")
                continue
            if explicit and control.labels and not _mapped_labels(control, detector):
                raise ApiError(400, f"control {control.name!r}: none of its labels {list(control.labels)} is a "
                                    f"class of {explicit} {sorted(detector.class_names.values())}; name them "
                                    f"alike or add predicted_values=\"class,...\" to a <Label>")
            for image in control.to_name:
                if image in config.images:
                    out.append(Target(control, image, model))
        return out

    def unmatched_labels(self, config: ParsedConfig) -> dict[str, list[str]]:
        """Per control that a detector fills: its labels that no model class maps to."""
        report = {}
        for target in self.targets(config):
            mapped = _mapped_labels(target.control, target.detector)
            missing = [label for label in target.control.labels if label not in mapped]
            if missing:
                report[target.control.name] = missing
        return report

    def predict(self, tasks: list[dict], images: list[dict[str, np.ndarray]],
                targets: list[Target]) -> list[tuple[list[dict], float]]:
        """Results and difficulty (P(needs work)) per task; `images[i]` maps image name -> array.

        A task's difficulty combines the difficulty of every (model, image) prediction it got."""
        out: list[tuple[list[dict], list[float]]] = [([], []) for _ in tasks]
        by_model: dict[int, list[Target]] = {}
        for target in targets:
            by_model.setdefault(id(target.model), []).append(target)
        for group in by_model.values():
            model = group[0].model
            for image_name in sorted({t.image for t in group}):
                idx = [i for i, imgs in enumerate(images) if image_name in imgs]
                for start in range(0, len(idx), self.batch):
                    chunk = idx[start:start + self.batch]
                    predictions: list[Prediction] = model.predict([images[i][image_name] for i in chunk])
                    for i, prediction in zip(chunk, predictions):
                        out[i][1].append(prediction.difficulty)
                        h, w = images[i][image_name].shape[:2]
                        for target in (t for t in group if t.image == image_name):
                            for region in prediction.regions:
                                label = target.control.label_for(region.label)
                                if label is None and region.kind != "keypoints":
                                    continue  # a class with no label in this control is dropped
                                results = detection_results(region, target.control, image_name, label, w, h,
                                                            self.polygon_tolerance)
                                out[i][0].extend(results)
        return [(results, combine_difficulty(difficulties)) for results, difficulties in out]


def _mapped_labels(control: Control, detector) -> set[str]:
    """The control's labels that some model class (or, for pose, keypoint name) maps to."""
    names = {str(n).strip().lower() for n in detector.class_names.values()}
    if detector.task == "pose":
        names |= {k.strip().lower() for k in getattr(detector, "keypoint_names", [])}
    return {label for name, label in control.class_map if name in names}


_ALL_OUTPUTS = {tag for tags in TASK_OUTPUTS.values() for tag in tags}
