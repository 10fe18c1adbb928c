"""Detectors: a local weights file in, typed `Region`s out, batched.

`YoloDetector` (ultralytics) covers boxes, rotated boxes, instance masks, keypoints and whole-image
classes. Importing this package is cheap: torch and ultralytics are imported only when weights are
loaded, so an untrained detector works without either installed.
"""
from __future__ import annotations

from pathlib import Path


class ModelLoadError(RuntimeError):
    """A weights file is missing, unreadable, corrupt or not a model this backend can run."""


from .yolo import TASKS, YoloDetector, rotated_box_corners, rotated_box_from_xywhr  # noqa: E402  (needs ModelLoadError)

__all__ = ["ModelLoadError", "TASKS", "YoloDetector", "create_detector", "rotated_box_corners",
           "rotated_box_from_xywhr"]


def create_detector(weights: str | Path | None = None, device: str = "auto", conf: float = 0.25,
                    iou: float = 0.7, imgsz: int | None = None) -> YoloDetector:
    """A detector for a local weights file, or the untrained one (no regions) when there is none."""
    if not weights:
        return YoloDetector.untrained()
    return YoloDetector.from_weights(weights, device=device, conf=conf, iou=iou, imgsz=imgsz)
