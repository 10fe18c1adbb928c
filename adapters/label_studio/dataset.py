"""Label Studio annotations -> backend training samples (per image a list of `Region`s, in pixels).

The only place that reads Label Studio annotation JSON for training; `backends.train` sees regions.

Per result type (geometry in pixels of the original image, continuous coordinates: pixel column i
covers x in [i, i + 1); Label Studio values are percent of `original_width` / `original_height`):

- rectanglelabels / rectangle: kind "box", geometry (x0, y0, x1, y1, rotation): the rectangle with
  top-left corner (x, y) and size (width, height) *before rotation*, rotated clockwise by `rotation`
  degrees about that corner (Label Studio's convention, the same as the detector's obb regions).
  extra["corners"] the four rotated corners, extra["bounds"] their axis-aligned bounds.
- polygonlabels / polygon: kind "polygon", geometry (N, 2) (x, y).
- brushlabels / brush: RLE decoded with label-studio-sdk -> bool mask -> kind "polygon" whose
  geometry is the outline of the mask's largest part (cv2.findContours, through the centres of the
  boundary pixels: +0.5, the inverse of results.mask_results); extra["mask"] the full bool mask.
- keypointlabels / keypoint: kind "keypoints", geometry (1, 3) (x, y, 2.0): one point per result,
  as Label Studio stores them. `group_keypoints` turns them into pose instances.
- choices: one kind "class" region per chosen value.

Annotations with `was_cancelled` are skipped, as are tasks with no other annotation; of the rest the
most recent (updated_at, then created_at, then id) wins. Results with a non-zero `image_rotation`
are skipped (the geometry would be in a rotated frame), as are results without original size.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import cv2
import numpy as np
from label_studio_sdk.converter.brush import decode_rle

from ...backends.detect.yolo import rotated_box_corners
from ...backends.types import Region
from .config import ParsedConfig, parse_label_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnnotatedImage:
    """One task's image and the regions of its winning annotation."""

    task_id: Any
    #: The image reference from the task data (URL or path), for the images loader.
    image: str | None
    width: int | None
    height: int | None
    regions: tuple[Region, ...]
    annotation_id: Any = None


def _first(value: dict, key: str) -> str | None:
    labels = value.get(key)
    return str(labels[0]) if isinstance(labels, list) and labels else None


def latest_annotation(task: dict) -> dict | None:
    """The most recent annotation of a task that was not cancelled, or None."""
    anns = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    if not anns:
        return None

    def key(a):
        ident = a.get("id")
        return (str(a.get("updated_at") or a.get("created_at") or ""), str(a.get("created_at") or ""),
                ident if isinstance(ident, (int, float)) else -1)

    return max(anns, key=key)


def mask_outline(mask: np.ndarray) -> np.ndarray | None:
    """The outline of the largest part of a bool mask as (N, 2) (x, y) through boundary pixel centres."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    pts = max(contours, key=cv2.contourArea).reshape(-1, 2).astype(np.float64) + 0.5
    return pts if len(pts) >= 3 else None


def result_to_regions(result: dict) -> list[Region]:
    """One Label Studio result -> regions in pixels (none for types a detector cannot learn)."""
    rtype = str(result.get("type", "")).lower()
    value = result.get("value") or {}
    extra = {"from_name": result.get("from_name"), "to_name": result.get("to_name"), "id": result.get("id")}
    if rtype == "choices":
        return [Region(str(c), "class", None, extra=dict(extra)) for c in value.get("choices") or []]
    if float(result.get("image_rotation") or 0) != 0:
        log.warning("skipping result %s: image_rotation is not supported for training", result.get("id"))
        return []
    w, h = result.get("original_width"), result.get("original_height")
    if not w or not h:
        log.warning("skipping result %s: no original_width/original_height", result.get("id"))
        return []
    w, h = float(w), float(h)
    if rtype in ("rectanglelabels", "rectangle"):
        x0, y0 = float(value["x"]) * w / 100.0, float(value["y"]) * h / 100.0
        bw, bh = float(value["width"]) * w / 100.0, float(value["height"]) * h / 100.0
        angle = float(value.get("rotation") or 0.0) % 360.0
        geometry = (x0, y0, x0 + bw, y0 + bh, angle)
        corners = rotated_box_corners(geometry)
        bounds = (*corners.min(0).tolist(), *corners.max(0).tolist())
        return [Region(_first(value, "rectanglelabels"), "box", geometry,
                       extra=dict(extra, corners=corners, bounds=tuple(bounds)))]
    if rtype in ("polygonlabels", "polygon"):
        pts = np.asarray(value.get("points") or [], np.float64).reshape(-1, 2) * np.array([w / 100.0, h / 100.0])
        if len(pts) < 3:
            return []
        return [Region(_first(value, "polygonlabels"), "polygon", pts, extra=extra)]
    if rtype in ("brushlabels", "brush"):
        if value.get("format", "rle") != "rle" or not value.get("rle"):
            return []
        hh, ww = int(round(h)), int(round(w))
        mask = np.reshape(decode_rle(value["rle"]), (hh, ww, 4))[:, :, 3] > 0
        outline = mask_outline(mask)
        if outline is None:
            return []
        return [Region(_first(value, "brushlabels"), "polygon", outline, extra=dict(extra, mask=mask))]
    if rtype in ("keypointlabels", "keypoint"):
        x, y = float(value["x"]) * w / 100.0, float(value["y"]) * h / 100.0
        return [Region(_first(value, "keypointlabels"), "keypoints", np.array([[x, y, 2.0]]), extra=extra)]
    return []


def annotation_regions(results: Iterable[dict], controls: Sequence[str] | None = None,
                       to_name: str | None = None) -> list[Region]:
    """The regions of an annotation's results, only from `controls` (names) / onto `to_name` if given."""
    out: list[Region] = []
    for r in results or ():
        if controls is not None and r.get("from_name") not in controls:
            continue
        if to_name is not None and r.get("to_name") not in (None, to_name):
            continue
        try:
            out.extend(result_to_regions(r))
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("skipping malformed result %s: %s", r.get("id"), exc)
    return out


def _size(results: Iterable[dict]) -> tuple[int | None, int | None]:
    for r in results or ():
        if r.get("original_width") and r.get("original_height"):
            return int(r["original_width"]), int(r["original_height"])
    return None, None


def tasks_to_samples(tasks: Iterable[dict], config: ParsedConfig | str | None = None,
                     controls: Sequence[str] | None = None, image_name: str | None = None) -> list[AnnotatedImage]:
    """Tasks (with `annotations`, as exported or fetched with label-studio-sdk) -> one AnnotatedImage
    per task that has a non-cancelled annotation. With a `config`, the image reference is read from
    the task data key of `image_name` (default: the config's first Image)."""
    parsed = parse_label_config(config) if isinstance(config, str) else config
    data_key = None
    if parsed is not None and parsed.images:
        image_name = image_name or next(iter(parsed.images))
        data_key = parsed.data_key(image_name)
    out = []
    for task in tasks:
        ann = latest_annotation(task)
        if ann is None:
            continue
        results = ann.get("result") or []
        data = task.get("data") or {}
        ref = data.get(data_key) if data_key else next((v for v in data.values() if isinstance(v, str)), None)
        w, h = _size(results)
        out.append(AnnotatedImage(task.get("id"), ref, w, h,
                                  tuple(annotation_regions(results, controls, image_name)), ann.get("id")))
    return out


def class_names(config: ParsedConfig | str, controls: Sequence[str] | None = None) -> list[str]:
    """The labels of the config's labelling controls (in config order, without duplicates)."""
    parsed = parse_label_config(config) if isinstance(config, str) else config
    names: list[str] = []
    for c in parsed.controls.values():
        if controls is not None and c.name not in controls:
            continue
        for label in c.labels:
            if label not in names:
                names.append(label)
    return names


def group_keypoints(regions: Sequence[Region], keypoint_names: Sequence[str],
                    instance_labels: Sequence[str] | None = None) -> list[Region]:
    """Pose instances from Label Studio's single points: each box region (of `instance_labels`, or any)
    collects the keypoints that lie inside its bounds (each point to the smallest such box); a point's
    label is its keypoint name. Returns kind "keypoints" regions with geometry (K, 3) (x, y, v) in the
    order of `keypoint_names` (v 0 and x = y = 0 for points not annotated) and extra["box"] the
    box bounds. Non-keypoint, non-box regions pass through unchanged."""
    names = list(keypoint_names)
    boxes = [r for r in regions if r.kind == "box" and (instance_labels is None or r.label in instance_labels)]
    points = [r for r in regions if r.kind == "keypoints" and np.asarray(r.geometry).shape == (1, 3)]
    bounds = [r.extra.get("bounds") or tuple(r.geometry[:4]) for r in boxes]
    kps = [np.zeros((len(names), 3)) for _ in boxes]
    for p in points:
        if p.label not in names:
            continue
        x, y = float(p.geometry[0][0]), float(p.geometry[0][1])
        inside = [i for i, b in enumerate(bounds) if b[0] <= x <= b[2] and b[1] <= y <= b[3]]
        if not inside:
            continue
        i = min(inside, key=lambda j: (bounds[j][2] - bounds[j][0]) * (bounds[j][3] - bounds[j][1]))
        kps[i][names.index(p.label)] = (x, y, 2.0)
    out = [Region(b.label, "keypoints", k, extra=dict(b.extra, box=tuple(bd)))
           for b, k, bd in zip(boxes, kps, bounds)]
    out.extend(r for r in regions if r.kind not in ("box", "keypoints"))
    return out
