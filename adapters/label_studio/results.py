"""Regions (pixels) to Label Studio result JSON (percent of the original image)."""
from __future__ import annotations

import uuid

import cv2
import numpy as np
from label_studio_sdk.converter.brush import mask2rle

from ...backends.types import Region
from .config import Control


def _base(control: Control, to_name: str, width: int, height: int, score: float) -> dict:
    return {
        "id": uuid.uuid4().hex[:10],
        "from_name": control.name,
        "to_name": to_name,
        "type": control.result_type,
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "score": float(score),
    }


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


def mask_results(region: Region, control: Control, to_name: str, label: str | None,
                 polygon_tolerance: float = 1.0) -> dict | None:
    """A mask region as a brush (RLE) or polygon result for `control`; None if the mask is empty."""
    mask = np.asarray(region.geometry, dtype=bool)
    height, width = mask.shape
    if not mask.any():
        return None
    result = _base(control, to_name, width, height, region.score)
    labels = [label] if label else []
    if control.tag in ("BrushLabels", "Brush"):
        value = {"format": "rle", "rle": mask2rle(mask.astype(np.uint8) * 255)}
    else:
        points = mask_to_polygon(mask, polygon_tolerance)
        if points is None:
            return None
        # Pixel centres sit at +0.5; percent of the full width/height as Label Studio expects.
        pct = np.column_stack([(points[:, 0] + 0.5) * 100.0 / width, (points[:, 1] + 0.5) * 100.0 / height])
        value = {"points": np.clip(pct, 0, 100).round(4).tolist(), "closed": True}
    if control.tag.endswith("Labels"):
        value[control.result_type] = labels
    result["value"] = value
    return result
