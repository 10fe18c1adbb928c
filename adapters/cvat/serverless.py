"""nuclio handlers for self-hosted CVAT's AI tools, and the label spec their function.yaml declares.

The folders nuclio/detector and nuclio/interactor hold each function's `function.yaml` and a
`main.py` whose `init_context` / `handler` call `init_detector` / `detect` and `init_interactor` /
`interact` here. Everything is decoded on the server. CVAT sends JSON and reads JSON back:

detector (metadata.annotations.type "detector")
  in:  {"image": base64 image file, "threshold": 0..1 (optional; else DETECT_CONF)}
  out: [{"label", "confidence", "type": "rectangle" | "mask" | "skeleton" | "tag",
         "points": [...], "rotation": degrees (rectangles),
         "mask": [0/1 per pixel of the mask's box, row by row] + [x0, y0, x1, y1] (masks; ends
                 inclusive; CVAT turns it into RLE, or uses "points", the outline, when asked to
                 convert masks to polygons),
         "elements": [{"label": keypoint, "type": "points", "points": [x, y], "outside"}] (skeletons),
         "attributes": [{"name": "uncertainty", "value": "0".."100"}]}, ...]

interactor (type "interactor")
  in:  {"image", "pos_points": [[x, y], ...], "neg_points": [[x, y], ...],
        "obj_bbox": [[x1, y1], [x2, y2]] or null}
  out: {"mask": rows of 0/255 over the mask's box, "bounds": [x0, y0, x1, y1] (ends inclusive),
        "points": [[x, y], ...] (the outline), "confidence": "0..1"}
  The image embedding is cached (bounded by EMBEDDING_CACHE_BYTES, keyed by the image file's hash
  and the segmenter), so clicks after the first on an image cost only the segmenter's `segment`.

Bad requests get a 4xx with {"error": message}; anything else a 500 with no traceback.

A detector's label spec depends on its weights; write it into function.yaml with
    python -m labelassist.adapters.cvat.serverless spec WEIGHTS --write adapters/cvat/nuclio/detector/function.yaml
"""
from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ...backends.cache import ByteLRU
from ...backends.detect import create_detector
from ...backends.types import Region
from ...settings import Settings
from ..errors import ApiError
from ..images import decode_image
from .convert import (UNCERTAINTY, UNCERTAINTY_VALUES, ModelLabels, instance_mask, keypoints, mask_bounds,
                      outline, prompt, rectangle, region_polygon, skeleton_svg, uncertainty_percent)
from .detector import create as create_detector_function
from .detector import predict
from .interactor import create as create_interactor_function

log = logging.getLogger(__name__)


# --- requests and responses ---------------------------------------------------------------------

def _body(event) -> dict[str, Any]:
    """The JSON body: nuclio hands it over parsed (content type application/json) or as bytes."""
    body = event.body
    try:
        if isinstance(body, (bytes, bytearray)):
            body = body.decode("utf-8")
        if isinstance(body, str):
            body = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise ApiError(400, "the body must be JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def _image_file(body: dict[str, Any], max_bytes: int) -> bytes:
    text = body.get("image")
    if not isinstance(text, str) or not text:
        raise ApiError(400, "'image' (a base64 image file) is required")
    if len(text) > (max_bytes + 2) // 3 * 4 + 4:
        raise ApiError(413, f"image is larger than {max_bytes} bytes")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "'image' is not valid base64") from None


def _respond(context, status: int, payload: Any):
    return context.Response(body=json.dumps(payload), headers={}, content_type="application/json",
                            status_code=status)


def _serve(context, event, work) -> Any:
    try:
        return _respond(context, 200, work(_body(event)))
    except ApiError as exc:
        context.logger.warn_with("bad request", status=exc.status, error=exc.message)
        return _respond(context, exc.status, {"error": exc.message})
    except Exception as exc:  # never a traceback to the client; the log has it
        context.logger.error_with("request failed", error=f"{type(exc).__name__}: {exc}")
        log.exception("request failed")
        return _respond(context, 500, {"error": "internal error"})


# --- detector -----------------------------------------------------------------------------------

class DetectorService:
    """Body -> image -> the detector (through its uncertainty estimator) -> CVAT's detector JSON."""

    def __init__(self, function, max_image_bytes: int, max_image_pixels: int):
        self.function = function  # a .detector.DetectorFunction: the estimator and its labels
        self.max_image_bytes = int(max_image_bytes)
        self.max_image_pixels = int(max_image_pixels)

    def __call__(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        threshold = body.get("threshold")
        if threshold is not None:
            try:
                threshold = None if isinstance(threshold, bool) else float(threshold)
            except (TypeError, ValueError):
                threshold = None
            if threshold is None or not 0 <= threshold <= 1:
                raise ApiError(400, "'threshold' must be a number between 0 and 1")
        image = decode_image(_image_file(body, self.max_image_bytes), self.max_image_pixels)
        prediction = predict(self.function.estimator, image, threshold)
        shapes = (self.shape(region, image.shape[:2]) for region in prediction.regions)
        return [s for s in shapes if s is not None]

    def shape(self, region: Region, image_size: tuple[int, int]) -> dict[str, Any] | None:
        fn = self.function
        out: dict[str, Any] = {"label": region.label, "confidence": f"{float(region.score):.4f}",
                               "attributes": ([{"name": UNCERTAINTY, "value": uncertainty_percent(region.uncertainty)}]
                                              if fn.with_uncertainty else [])}
        if region.kind == "class":
            return {**out, "type": "tag"}
        if region.kind == "box":
            points, rotation = rectangle(region)
            return {**out, "type": "rectangle", "points": points, "rotation": rotation}
        if region.kind == "keypoints":
            class_id = int(region.extra.get("class_id", -1))
            names = fn.labels.keypoints.get(class_id) or region.extra.get("keypoint_names") or []
            points = keypoints(region, fn.keypoint_conf)
            if all(outside for _, _, outside in points):
                return None
            elements = [{"label": name, "type": "points", "points": [x, y], "outside": outside, "attributes": []}
                        for name, (x, y, outside) in zip(names, points)]
            return {**out, "type": "skeleton", "elements": elements}
        if region.kind in ("polygon", "mask"):
            mask = instance_mask(region, image_size)
            if mask is None:
                return None
            x0, y0, x1, y1 = mask_bounds(mask)
            bitmap = mask[y0:y1 + 1, x0:x1 + 1].astype(np.uint8).ravel().tolist() + [x0, y0, x1, y1]
            shape = {**out, "type": "mask", "mask": bitmap}
            points = region_polygon(region, image_size, fn.polygon_tolerance)
            if points is not None:  # else CVAT keeps the mask even when asked for polygons
                shape["points"] = points
            return shape
        return None


def init_detector(context) -> None:
    """nuclio init_context: the detector from the settings (YOLO_WEIGHTS, DEVICE, DETECT_CONF, ...)."""
    settings = Settings()
    function = create_detector_function()
    context.user_data.detector = DetectorService(function, settings.max_image_bytes, settings.max_image_pixels)
    context.logger.info_with("labelassist detector ready", model=function.estimator.model_version,
                             task=function.labels.task, labels=json.dumps(sorted(function.labels.names.values())))


def detect(context, event):
    """nuclio handler of the detector function."""
    return _serve(context, event, context.user_data.detector)


# --- interactor ---------------------------------------------------------------------------------

class InteractorService:
    """Body -> cached embedding + prompt -> the segmenter -> CVAT's interactor JSON."""

    def __init__(self, segmenter, cache_bytes: int, max_image_bytes: int, max_image_pixels: int,
                 polygon_tolerance: float = 1.0):
        self.segmenter = segmenter
        self.cache = ByteLRU(cache_bytes, lambda e: e.nbytes)
        self.max_image_bytes = int(max_image_bytes)
        self.max_image_pixels = int(max_image_pixels)
        self.polygon_tolerance = float(polygon_tolerance)

    def __call__(self, body: dict[str, Any]) -> dict[str, Any]:
        data = _image_file(body, self.max_image_bytes)
        try:
            request = prompt(body.get("pos_points"), body.get("neg_points"), body.get("obj_bbox"))
        except (ValueError, TypeError) as exc:
            raise ApiError(400, str(exc)) from None
        key = (hashlib.blake2b(data, digest_size=16).hexdigest(), self.segmenter.model_id)
        embedding = self.cache.get_or_compute(
            key, lambda: self.segmenter.embed(decode_image(data, self.max_image_pixels)))
        if request.is_empty:
            return self.empty()
        region = self.segmenter.segment(embedding, request)
        mask = np.asarray(region.geometry, dtype=bool)
        if not mask.any():
            return self.empty()
        x0, y0, x1, y1 = mask_bounds(mask)
        points = outline(mask, self.polygon_tolerance)
        return {"mask": (mask[y0:y1 + 1, x0:x1 + 1].astype(np.uint8) * 255).tolist(),
                "bounds": [x0, y0, x1, y1],
                "points": [] if points is None else points.tolist(),
                "confidence": f"{float(np.clip(region.score, 0.0, 1.0)):.4f}"}

    @staticmethod
    def empty() -> dict[str, Any]:
        """No object: an empty one-pixel mask and no outline (CVAT then draws nothing)."""
        return {"mask": [[0]], "bounds": [0, 0, 0, 0], "points": [], "confidence": "0"}


def init_interactor(context) -> None:
    """nuclio init_context: the segmenter from the settings (SEGMENTER, SAM_CHECKPOINT, DEVICE, ...)."""
    settings = Settings()
    function = create_interactor_function()
    context.user_data.interactor = InteractorService(function.segmenter, settings.embedding_cache_bytes,
                                                     settings.max_image_bytes, settings.max_image_pixels,
                                                     settings.polygon_tolerance)
    context.logger.info_with("labelassist interactor ready", segmenter=function.segmenter.model_id)


def interact(context, event):
    """nuclio handler of the interactor function."""
    return _serve(context, event, context.user_data.interactor)


# --- the label spec of function.yaml ------------------------------------------------------------

def nuclio_spec(labels: ModelLabels, with_uncertainty: bool = True) -> list[dict[str, Any]]:
    """The `spec` annotation of a detector's function.yaml: CVAT's label list for the model."""
    attributes = ([{"name": UNCERTAINTY, "input_type": "number", "values": list(UNCERTAINTY_VALUES)}]
                  if with_uncertainty else [])
    spec = []
    for class_id, name in sorted(labels.names.items()):
        item: dict[str, Any] = {"id": class_id, "name": name, "type": labels.label_type,
                                "attributes": [dict(a) for a in attributes]}
        if labels.task == "pose":
            names = labels.keypoints[class_id]
            item["sublabels"] = [{"id": j, "name": kp, "type": "points", "attributes": []}
                                 for j, kp in enumerate(names)]
            item["svg"] = skeleton_svg(names)
        spec.append(item)
    return spec


def write_spec(function_yaml: str, spec: list[dict[str, Any]]) -> str:
    """function.yaml text with its `metadata.annotations.spec` block replaced by `spec` (the rest,
    comments included, kept as it is)."""
    lines = function_yaml.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == "    spec: |"), None)
    if start is None:
        raise ValueError("no '    spec: |' line under metadata.annotations")
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or lines[end].startswith(" " * 6)):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():  # blank lines before the next key stay
        end -= 1
    rows = ",\n".join("  " + json.dumps(item) for item in spec)
    text = f"[\n{rows}\n]" if spec else "[]"  # one label a line
    body = "".join(" " * 6 + line + "\n" for line in text.splitlines())
    return "".join(lines[:start + 1]) + body + "".join(lines[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labelassist.adapters.cvat.serverless",
                                     description="Label spec of the CVAT nuclio detector for given weights.")
    sub = parser.add_subparsers(dest="command", required=True)
    spec = sub.add_parser("spec", help="print the spec (JSON), or write it into a function.yaml")
    spec.add_argument("weights", help="ultralytics .pt file the function will serve")
    spec.add_argument("--write", metavar="FUNCTION_YAML", help="replace the spec annotation in this file")
    spec.add_argument("--no-uncertainty", action="store_true", help="leave out the uncertainty attribute")
    args = parser.parse_args(argv)
    labels = ModelLabels.of(create_detector(args.weights, device="cpu"))
    result = nuclio_spec(labels, with_uncertainty=not args.no_uncertainty)
    if args.write:
        path = Path(args.write)
        path.write_text(write_spec(path.read_text(), result))
        print(f"wrote the spec of {len(result)} {labels.label_type} labels into {path}", file=sys.stderr)
    else:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
