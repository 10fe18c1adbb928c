"""Batch pre-labels: every image control the configured detectors can fill, for many tasks at once.

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

from ...backends.types import Region
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
    detector: object


def resolve_model_path(models_dir: Path, value: str | Path) -> Path:
    """A weights path inside `models_dir` (relative paths are taken from it); anything else is 400."""
    root = Path(models_dir).resolve()
    candidate = Path(value)
    path = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if path != root and root not in path.parents:
        raise ApiError(400, f"model_path {str(value)!r} is outside the models folder (MODELS_DIR)")
    return path


class Prelabeler:
    def __init__(self, default_detector, models_dir: Path, load: Callable[[Path], object],
                 polygon_tolerance: float = 1.0, batch: int = 16):
        self.default = default_detector
        self.models_dir = models_dir
        self._load = load
        self._loaded: dict[Path, object] = {}
        self._lock = threading.Lock()
        self.polygon_tolerance = polygon_tolerance
        self.batch = batch

    def detector_for(self, control: Control):
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
            detector = self.detector_for(control) if control.attr("model_path") or control.tag in _ALL_OUTPUTS else None
            if detector is None or not getattr(detector, "trained", False):
                continue
            if control.tag not in TASK_OUTPUTS.get(detector.task, ()):
                continue
            for image in control.to_name:
                if image in config.images:
                    out.append(Target(control, image, detector))
        return out

    def unmatched_labels(self, config: ParsedConfig) -> dict[str, list[str]]:
        """Per control that a detector fills: its labels that no model class maps to."""
        report = {}
        for target in self.targets(config):
            classes = {str(n).strip().lower() for n in target.detector.class_names.values()}
            mapped = {label for name, label in target.control.class_map if name in classes}
            if target.detector.task == "pose":
                mapped |= {label for name, label in target.control.class_map
                           if name in {k.lower() for k in getattr(target.detector, "keypoint_names", ())}}
            missing = [label for label in target.control.labels if label not in mapped]
            if missing:
                report[target.control.name] = missing
        return report

    def predict(self, tasks: list[dict], images: list[dict[str, np.ndarray]], config: ParsedConfig,
                targets: list[Target]) -> list[tuple[list[dict], list[Region]]]:
        """Results and the regions behind them, per task; `images[i]` maps image name -> array."""
        out: list[tuple[list[dict], list[Region]]] = [([], []) for _ in tasks]
        by_detector: dict[int, list[Target]] = {}
        for target in targets:
            by_detector.setdefault(id(target.detector), []).append(target)
        for group in by_detector.values():
            detector = group[0].detector
            for image_name in sorted({t.image for t in group}):
                idx = [i for i, imgs in enumerate(images) if image_name in imgs]
                for start in range(0, len(idx), self.batch):
                    chunk = idx[start:start + self.batch]
                    regions_per_image = detector.predict([images[i][image_name] for i in chunk])
                    for i, regions in zip(chunk, regions_per_image):
                        h, w = images[i][image_name].shape[:2]
                        for target in (t for t in group if t.image == image_name):
                            for region in regions:
                                label = target.control.label_for(region.label)
                                if label is None and region.kind != "keypoints":
                                    continue  # a class with no label in this control is dropped
                                results = detection_results(region, target.control, image_name, label, w, h,
                                                            self.polygon_tolerance)
                                if results:
                                    out[i][0].extend(results)
                                    out[i][1].append(region)
        return out


_ALL_OUTPUTS = {tag for tags in TASK_OUTPUTS.values() for tag in tags}


def task_difficulty(regions: list[Region], extra_risk: float = 0.0) -> float:
    """Probability that a task's pre-annotation needs work: any region wrong, or a miss."""
    keep = (1.0 - float(extra_risk))
    for region in regions:
        keep *= 1.0 - float(region.uncertainty)
    return float(np.clip(1.0 - keep, 0.0, 1.0))
