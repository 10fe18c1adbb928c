"""Regions (pixels) to Label Studio result JSON (percent of the original image)."""
from __future__ import annotations

import uuid

import cv2
import numpy as np
from label_studio_sdk.converter.brush import mask2rle

from ...backends.types import Region
from .config import Control


def _base(control: Control, to_name: str, width: int, height: int, region: Region) -> dict:
    result = {
        "id": uuid.uuid4().hex[:10],
        "from_name": control.name,
        "to_name": to_name,
        "type": control.result_type,
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "score": round(float(region.score), 4),
    }
    if region.uncertainty is not None and region.kind != "mask":
        # Shown to reviewers in the region's meta field.
        result["meta"] = {"text": [f"uncertainty {region.uncertainty:.2f}"]}
    return result


def _labelled(control: Control, value: dict, label: str | None) -> dict:
    if control.tag.endswith("Labels"):
        value[control.result_type] = [label] if label else []
    return value


def mask_to_polygon(mask: np.ndarray, tolerance: float = 1.0) -> np.ndarray | None:
    """The outline of the largest connected part of `mask`, simplified, as (N, 2) pixel (x, y)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    largest = max(contours, key=cv2.contourArea)
    if tolerance > 0:
        largest = cv2.approxPolyDP(largest, tolerance, True)
    points = largest.reshape(-1, 2).astype(np.float64)
    return points if len(points) >= 3 else None


def _polygon_value(points: np.ndarray, width: int, height: int) -> dict:
    # Pixel centres sit at +0.5; percent of the full width/height as Label Studio expects.
    pct = np.column_stack([(points[:, 0] + 0.5) * 100.0 / width, (points[:, 1] + 0.5) * 100.0 / height])
    return {"points": np.clip(pct, 0, 100).round(4).tolist(), "closed": True}


def mask_results(region: Region, control: Control, to_name: str, label: str | None,
                 polygon_tolerance: float = 1.0) -> dict | None:
    """A mask region as a brush (RLE) or polygon result for `control`; None if the mask is empty."""
    mask = np.asarray(region.geometry, dtype=bool)
    height, width = mask.shape
    if not mask.any():
        return None
    result = _base(control, to_name, width, height, region)
    if control.tag in ("BrushLabels", "Brush"):
        value = {"format": "rle", "rle": mask2rle(mask.astype(np.uint8) * 255)}
    else:
        points = mask_to_polygon(mask, polygon_tolerance)
        if points is None:
            return None
        value = _polygon_value(points, width, height)
    result["value"] = _labelled(control, value, label)
    return result


def detection_results(region: Region, control: Control, to_name: str, label: str | None,
                      width: int, height: int, polygon_tolerance: float = 1.0) -> list[dict]:
    """A detector region as the results `control` can hold (none if it can hold none of it)."""
    tag = control.tag
    if tag in ("RectangleLabels", "Rectangle") and region.kind == "box":
        x0, y0, x1, y1, angle = (list(region.geometry) + [0.0])[:5]
        value = {"x": x0 * 100.0 / width, "y": y0 * 100.0 / height, "width": (x1 - x0) * 100.0 / width,
                 "height": (y1 - y0) * 100.0 / height, "rotation": float(angle)}
        return [dict(_base(control, to_name, width, height, region), value=_labelled(control, value, label))]
    if tag in ("PolygonLabels", "Polygon") and region.kind == "polygon":
        points = np.asarray(region.geometry, dtype=np.float64)
        if len(points) < 3:
            return []
        value = _polygon_value(points, width, height)
        return [dict(_base(control, to_name, width, height, region), value=_labelled(control, value, label))]
    if tag in ("BrushLabels", "Brush") and region.extra.get("mask") is not None:
        mask_region = Region(region.label, "mask", region.extra["mask"], region.score, region.uncertainty)
        result = mask_results(mask_region, control, to_name, label, polygon_tolerance)
        if result is not None:
            result["meta"] = {"text": [f"uncertainty {region.uncertainty:.2f}"]}
        return [result] if result else []
    if tag in ("KeyPointLabels", "KeyPoint") and region.kind == "keypoints":
        names = region.extra.get("keypoint_names") or []
        out = []
        for i, (x, y, vis) in enumerate(np.asarray(region.geometry, dtype=np.float64)):
            if vis <= 0:
                continue
            # Each keypoint is its own region, labelled by the point's name when the config has it.
            kp_label = control.label_for(names[i]) if i < len(names) else None
            value = {"x": x * 100.0 / width, "y": y * 100.0 / height, "width": 0.5}
            point = Region(region.label, "keypoints", None, float(vis) * region.score, region.uncertainty)
            out.append(dict(_base(control, to_name, width, height, point),
                            value=_labelled(control, value, kp_label or label)))
        return out
    if tag == "Choices" and region.kind == "class":
        return [dict(_base(control, to_name, width, height, region), value={"choices": [label]})]
    return []
