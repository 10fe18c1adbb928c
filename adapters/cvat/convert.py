"""Tool-side formats <-> backend types for CVAT: images, prompts, label lists and region geometry.

Shared by the cvat-sdk functions (`detector`, `interactor`) and the nuclio handlers (`serverless`);
the SDK's and nuclio's own JSON shapes are built there, from the pieces here.

Coordinates are pixels of the original image, as in the backends. CVAT's conventions:

- rectangle: points [xtl, ytl, xbr, ybr] of the box before rotation and `rotation` in degrees
  (0..360), clockwise on screen about the box's centre. Our "box" geometry rotates about its corner
  (x0, y0) instead (see backends.detect.yolo), so the centre is taken from the rotated corners.
- mask: a bitmap cut to its bounding box [x0, y0, x1, y1] with inclusive ends (x1 = last column).
- skeleton: one "points" element per keypoint of the label, `outside` when the model is not sure
  the point is there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import cv2
import numpy as np

from ...backends.detect import rotated_box_corners
from ...backends.types import Prompt, Region

#: Our uncertainty as a CVAT number attribute: an integer percentage (0 = surely right).
UNCERTAINTY = "uncertainty"
UNCERTAINTY_ID = 0
#: A CVAT number attribute declares [min, max, step] as strings.
UNCERTAINTY_VALUES = ("0", "100", "1")

#: The CVAT label type each detector task fills.
LABEL_TYPES = {"detect": "rectangle", "obb": "rectangle", "segment": "mask", "pose": "skeleton",
               "classify": "tag"}


@dataclass(frozen=True)
class ModelLabels:
    """What a detector can name, in CVAT's terms: its task, class names by id and, for pose models,
    the keypoint names of each class (in the model's order)."""

    task: str
    names: dict[int, str]
    keypoints: dict[int, list[str]] = field(default_factory=dict)

    @property
    def label_type(self) -> str:
        return LABEL_TYPES[self.task]

    @classmethod
    def of(cls, detector) -> "ModelLabels":
        names = {int(k): str(v) for k, v in detector.class_names.items()}
        keypoints = {k: _keypoint_names(detector, k) for k in names} if detector.task == "pose" else {}
        return cls(detector.task, names, keypoints)


def _keypoint_names(detector, class_id: int) -> list[str]:
    """The keypoint names a pose detector gives the regions of `class_id` (extra["keypoint_names"])."""
    names = detector.keypoint_names_for(class_id)
    if not names:
        raise ValueError("pose model without a keypoint shape (kpt_shape)")
    return names


def uncertainty_percent(uncertainty: float) -> str:
    """0..1 -> "0".."100", the value of the uncertainty attribute."""
    return str(int(round(float(np.clip(uncertainty, 0.0, 1.0)) * 100)))


# --- images and prompts -------------------------------------------------------------------------

def image_array(image) -> np.ndarray:
    """A PIL image as the backends take it: gray stays gray (16-bit and float too), the rest RGB."""
    mode = image.mode
    if mode in ("L", "RGB"):
        return np.asarray(image)
    if mode == "1":
        return np.asarray(image.convert("L"))
    if mode.startswith("I;16"):
        return np.asarray(image).astype(np.uint16)
    if mode in ("I", "F"):
        return np.asarray(image)
    return np.asarray(image.convert("RGB"))


def _pairs(points: Any, what: str) -> list[tuple[float, float]]:
    if points is None:
        return []
    arr = np.asarray(points, dtype=np.float64)
    if arr.size == 0:
        return []
    if arr.ndim != 2 or arr.shape[1] != 2 or not np.isfinite(arr).all():
        raise ValueError(f"{what} must be a list of [x, y] pairs")
    return [(float(x), float(y)) for x, y in arr]


def prompt(pos_points: Any = (), neg_points: Any = (), box: Any = None) -> Prompt:
    """CVAT's clicks and box (((x1, y1), (x2, y2)), [[x1, y1], [x2, y2]] or [x1, y1, x2, y2]) as a
    `Prompt`. Raises ValueError on malformed input."""
    pos, neg = _pairs(pos_points, "pos_points"), _pairs(neg_points, "neg_points")
    xyxy = None
    if box is not None and len(box):
        corners = np.asarray(box, dtype=np.float64).reshape(-1)
        if corners.shape != (4,) or not np.isfinite(corners).all():
            raise ValueError("the box must be two [x, y] corners")
        x0, x1 = sorted(corners[[0, 2]])
        y0, y1 = sorted(corners[[1, 3]])
        if x1 <= x0 or y1 <= y0:
            raise ValueError("the box has no area")
        xyxy = (float(x0), float(y0), float(x1), float(y1))
    return Prompt(points=tuple(pos + neg), positive=(True,) * len(pos) + (False,) * len(neg), box=xyxy)


# --- geometry -----------------------------------------------------------------------------------

def rectangle(region: Region) -> tuple[list[float], float]:
    """A "box" region as CVAT's rectangle: ([xtl, ytl, xbr, ybr], rotation in degrees)."""
    g = [float(v) for v in region.geometry]
    x0, y0, x1, y1 = g[:4]
    angle = g[4] % 360.0 if len(g) > 4 else 0.0
    if angle == 0.0:
        return [x0, y0, x1, y1], 0.0
    cx, cy = rotated_box_corners((x0, y0, x1, y1, angle)).mean(axis=0)
    w, h = x1 - x0, y1 - y0
    return [float(cx - w / 2), float(cy - h / 2), float(cx + w / 2), float(cy + h / 2)], angle


def polygon_points(points: np.ndarray | None) -> list[float] | None:
    """(N, 2) (x, y) -> [x1, y1, x2, y2, ...], or None when it is not a polygon (under 3 points)."""
    if points is None:
        return None
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return pts.ravel().tolist() if len(pts) >= 3 else None


def region_polygon(region: Region, image_size: tuple[int, int], tolerance: float = 1.0) -> list[float] | None:
    """A polygon or mask region as CVAT polygon points: a polygon's own outline, else (a mask, or an
    outline of under 3 points) the outline of its mask's largest part; None when there is none."""
    if region.kind == "polygon":
        points = polygon_points(region.geometry)
        if points is not None:
            return points
    mask = instance_mask(region, image_size)
    return None if mask is None else polygon_points(outline(mask, tolerance))


def instance_mask(region: Region, shape: tuple[int, int]) -> np.ndarray | None:
    """The bool (H, W) mask of a mask or polygon region (a polygon without one is filled), or None."""
    mask = region.geometry if region.kind == "mask" else region.extra.get("mask")
    if mask is None and region.kind == "polygon":
        filled = np.zeros(shape, np.uint8)
        pts = np.round((np.asarray(region.geometry, np.float64).reshape(-1, 2) - 0.5) * 16).astype(np.int32)
        cv2.fillPoly(filled, [pts], 1, lineType=cv2.LINE_8, shift=4)
        mask = filled
    if mask is None:
        return None
    mask = np.asarray(mask, dtype=bool)
    return mask if mask.any() else None


def outline(mask: np.ndarray, tolerance: float = 1.0) -> np.ndarray | None:
    """(N, 2) (x, y) outline of the mask's largest part through its boundary pixels' centres,
    simplified by `tolerance` pixels; None when there is no polygon."""
    contours, _ = cv2.findContours(np.asarray(mask, np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    part = max(contours, key=lambda c: (cv2.contourArea(c), len(c)))
    if tolerance > 0 and len(part) > 3:
        part = cv2.approxPolyDP(part, tolerance, True)
    pts = part.reshape(-1, 2).astype(np.float64) + 0.5
    return pts if len(pts) >= 3 else None


def mask_bounds(mask: np.ndarray) -> tuple[int, int, int, int]:
    """[x0, y0, x1, y1] of a non-empty mask, ends inclusive (CVAT's mask box)."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def keypoints(region: Region, min_conf: float) -> list[tuple[float, float, bool]]:
    """(x, y, outside) per keypoint of a "keypoints" region: outside when its confidence < min_conf."""
    return [(float(x), float(y), bool(conf < min_conf))
            for x, y, conf in np.asarray(region.geometry, dtype=np.float64).reshape(-1, 3)]


def skeleton_svg(names: Sequence[str]) -> str:
    """A CVAT skeleton drawing: the points on a circle in a 100 x 100 box, in order, unconnected."""
    nodes = []
    for i, name in enumerate(names, start=1):
        t = 2 * np.pi * (i - 1) / max(len(names), 1) - np.pi / 2
        x, y = 50 + 35 * np.cos(t), 50 + 35 * np.sin(t)
        nodes.append(f'<circle r="1.5" cx="{x:.2f}" cy="{y:.2f}" data-type="element node" '
                     f'data-element-id="{i}" data-node-id="{i}" data-label-name="{_xml(name)}"></circle>')
    return "".join(nodes)


def _xml(text: str) -> str:
    return (str(text).replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")
            .replace(">", "&gt;"))
