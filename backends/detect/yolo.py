"""Ultralytics YOLO behind a tool-agnostic interface: numpy images in, `Region`s out, batched.

One `predict` call runs ultralytics once for the whole list of images (one batch), under a lock,
since an ultralytics model keeps its predictor (and its state) between calls.

Geometry, in pixels of each original image (continuous coordinates: pixel column i covers
x in [i, i + 1)), by the model's task:

- detect:   kind "box", geometry (x0, y0, x1, y1, 0.0).
- obb:      kind "box", geometry (x0, y0, x1, y1, angle): the rectangle with corners (x0, y0) and
            (x1, y1) *before rotation*, rotated clockwise on screen (y points down) by `angle`
            degrees (0 <= angle < 360) about its corner (x0, y0). This is Label Studio's rectangle
            convention (x, y, width, height, rotation) with width = x1 - x0, height = y1 - y0, so
            with angle 0 it is an ordinary box. `rotated_box_corners(geometry)` gives the four
            corners; extra["corners"] has them too, extra["bounds"] the axis-aligned bounds
            (x0, y0, x1, y1) and extra["xywhr"] ultralytics' (cx, cy, w, h, angle in radians).
- segment:  kind "polygon", geometry (N, 2) float (x, y): the outline of the largest part of the
            instance mask; extra["mask"] the bool (H, W) mask at the original size and
            extra["box"] the (x0, y0, x1, y1) box the model predicted.
- pose:     kind "keypoints", geometry (K, 3) float (x, y, confidence); extra["box"] the box,
            extra["keypoint_names"] the names of the K points (from the model when it was trained
            with `kpt_names`, else "kp0".."kpK-1"). Models trained without visibility give
            confidence 1.0.
- classify: kind "class", geometry None, label the top-1 class, score its probability,
            extra["probs"] the full probability vector.

Every region: label = class name, score = model confidence, uncertainty = 1 - score (a placeholder
for a calibrated estimate), and raw signals for uncertainty estimation in `extra`: "class_id";
"class_scores" (the per-class scores of the detection, where the model exposes them: every task
but classify, on models with NMS; end-to-end models report only the winning score) and "margin"
(top-1 minus top-2 class score, or probability for classify); "above_threshold" (score >= the
detector's conf: False only for near-threshold candidates from `candidates`).
"""
from __future__ import annotations

import hashlib
import math
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..image import to_rgb8
from ..types import Region
from . import ModelLoadError

TASKS = ("detect", "obb", "segment", "pose", "classify")

# Bytes of float32 scratch allowed when bringing instance masks back to the original size.
_MASK_SCRATCH_BYTES = 64 * 2**20


def import_ultralytics():
    """Import ultralytics offline and without its process-wide side effects on other code.

    - Offline: a backend must never download (weights, fonts), pip-install packages or send usage
      events. Ultralytics decides whether it is online when first imported, so this must run
      before anything else imports it. Explicit settings in the environment win.
    - Importing ultralytics replaces `PIL.Image.open` with a wrapper that, on an unidentified
      image, tries to pip-install and import pi-heif (so a non-image raises ModuleNotFoundError
      instead of PIL's UnidentifiedImageError everywhere in the process), and sets OpenCV to a
      single thread (cv2.setNumThreads(0)). Both are undone here; the detector passes decoded
      arrays and needs neither.
    """
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    import sys

    first = "ultralytics" not in sys.modules
    import cv2

    cv2_threads = cv2.getNumThreads()
    import ultralytics
    from PIL import Image

    patches = sys.modules.get("ultralytics.utils.patches")
    if getattr(Image.open, "__module__", "") == "ultralytics.utils.patches" and hasattr(patches, "_image_open"):
        Image.open = patches._image_open
    if first:
        cv2.setNumThreads(cv2_threads)
    return ultralytics


def resolve_device(device: str = "auto") -> str:
    if device != "auto":
        return device
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def file_digest(path: Path, digest_size: int = 6) -> str:
    h = hashlib.blake2b(digest_size=digest_size)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rotated_box_corners(geometry) -> np.ndarray:
    """The four (x, y) corners of a "box" geometry (x0, y0, x1, y1, angle), rotated clockwise by
    angle degrees about (x0, y0); in order: (x0, y0), (x1, y0), (x1, y1), (x0, y1) before rotation."""
    x0, y0, x1, y1, angle = (float(v) for v in geometry)
    a = math.radians(angle)
    c, s = math.cos(a), math.sin(a)
    local = np.array([[0.0, 0.0], [x1 - x0, 0.0], [x1 - x0, y1 - y0], [0.0, y1 - y0]])
    rot = np.array([[c, -s], [s, c]])  # clockwise on screen, where y points down
    return local @ rot.T + np.array([x0, y0])


def rotated_box_from_xywhr(cx: float, cy: float, w: float, h: float, r: float) -> tuple[float, ...]:
    """Ultralytics' rotated box (centre, size, angle in radians; the width axis points along
    (cos r, sin r) with y down) -> "box" geometry (x0, y0, x1, y1, angle degrees in [0, 360))
    rotated clockwise about (x0, y0): the corner that is top-left before rotation."""
    c, s = math.cos(r), math.sin(r)
    x0 = cx - w / 2 * c + h / 2 * s  # centre - w/2 along (cos r, sin r) - h/2 along (-sin r, cos r)
    y0 = cy - w / 2 * s - h / 2 * c
    angle = math.degrees(r) % 360.0
    return float(x0), float(y0), float(x0 + w), float(y0 + h), 0.0 if angle >= 360.0 else float(angle)


class YoloDetector:
    """A YOLO model from a local weights file (or none: `untrained()`), answering batches of images.

    Attributes: `task` (one of TASKS), `class_names` ({id: name}), `model_id` (short, derived from
    the weights file's content), `trained` (False only for the untrained stand-in).
    """

    def __init__(self, model: Any | None = None, model_id: str = "yolo-untrained", device: str = "cpu",
                 conf: float = 0.25, iou: float = 0.7, imgsz: int | None = None, max_det: int = 300,
                 task: str = "detect", class_names: dict[int, str] | None = None):
        self._yolo = model
        self.model_id = model_id
        self.device = device
        self.conf = float(conf)
        self.iou = float(iou)
        self.imgsz = imgsz
        self.max_det = int(max_det)
        self.trained = model is not None
        self.task = str(model.task) if model is not None else task
        if self.task not in TASKS:
            raise ModelLoadError(f"unsupported YOLO task {self.task!r}; supported: {', '.join(TASKS)}")
        names = model.names if model is not None else (class_names or {})
        self.class_names = {int(k): str(v) for k, v in dict(names).items()}
        inner = getattr(model, "model", None)
        self._keypoint_names = getattr(inner, "kpt_names", None) if self.task == "pose" else None
        self._lock = threading.Lock()
        # Class scores of the forward passes of the current call, filled by a hook on the head (under
        # the lock). The hook is a plain closure over this list: ultralytics deep-copies the model
        # into its predictor, hooks included, and a closure is copied by reference, so the copy's
        # hook still fills this list.
        self._captured: list[Any] = []
        self._hook = None
        if model is not None and self.task != "classify":
            from ultralytics.nn.modules.head import Detect  # detect, segment, pose and obb heads

            head = inner.model[-1] if hasattr(inner, "model") else None
            if isinstance(head, Detect) and not getattr(head, "end2end", False):
                self._hook = head.register_forward_hook(
                    _score_capture(self._captured, int(getattr(head, "nc", len(self.class_names)))))

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def from_weights(cls, path: str | Path, device: str = "auto", conf: float = 0.25, iou: float = 0.7,
                     imgsz: int | None = None, max_det: int = 300) -> "YoloDetector":
        """Load a local ultralytics checkpoint (.pt). Nothing is ever downloaded.

        Raises ModelLoadError (naming the file) when it is missing, not a .pt file, truncated or
        corrupt, or not an ultralytics model of a supported task. The file is first read with
        torch's restricted (weights_only) unpickler and ultralytics' allow-list of model classes, so
        a checkpoint that would run arbitrary code is refused before the regular load.
        """
        path = Path(path).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"YOLO weights not found: {path}")
        if path.suffix.lower() != ".pt":
            raise ModelLoadError(f"YOLO weights must be an ultralytics .pt file: {path}")
        import_ultralytics()
        from ultralytics import YOLO
        from ultralytics.nn.tasks import torch_safe_load

        try:
            ckpt, _ = torch_safe_load(str(path), safe_only=True)
            candidate = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else None
            if candidate is None or not hasattr(candidate, "yaml"):
                raise TypeError("no ultralytics model in the checkpoint")
            del ckpt, candidate
            model = YOLO(str(path))
        except Exception as exc:  # truncated, corrupt, not a checkpoint, not a YOLO model
            raise ModelLoadError(f"cannot load YOLO weights {path.name} ({path}): "
                                 f"{type(exc).__name__}: {_first_line(exc)}") from exc
        if model.task not in TASKS:
            raise ModelLoadError(f"YOLO weights {path.name} are for task {model.task!r}; "
                                 f"supported: {', '.join(TASKS)}")
        model_id = f"yolo-{model.task}-{file_digest(path)}"
        return cls(model, model_id, resolve_device(device), conf, iou, imgsz, max_det)

    @classmethod
    def untrained(cls, task: str = "detect", class_names: dict[int, str] | None = None) -> "YoloDetector":
        """A stand-in with no model: every image gets no regions, and `trained` is False."""
        return cls(None, "yolo-untrained", "cpu", task=task, class_names=class_names)

    def describe(self) -> dict[str, Any]:
        return {"detector": "yolo", "model_id": self.model_id, "task": self.task, "trained": self.trained,
                "classes": [self.class_names[k] for k in sorted(self.class_names)], "device": self.device}

    # --- inference ------------------------------------------------------------------------------

    def predict(self, images: list[np.ndarray], conf: float | None = None,
                iou: float | None = None) -> list[list[Region]]:
        """Regions for each image (gray/RGB/RGBA, 8/16-bit or float), in the order given.

        One ultralytics call (one batch) for the whole list, so the caller chooses the batch size.
        `conf`/`iou` override the detector's thresholds for this call (e.g. a low conf to see
        near-threshold candidates).
        """
        images = list(images)
        if not self.trained or not images:
            return [[] for _ in images]
        # Ultralytics takes numpy images as OpenCV does: BGR.
        bgr = [np.ascontiguousarray(to_rgb8(im)[:, :, ::-1]) for im in images]
        kwargs: dict[str, Any] = dict(conf=self.conf if conf is None else float(conf),
                                      iou=self.iou if iou is None else float(iou),
                                      device=self.device, max_det=self.max_det, verbose=False,
                                      save=False, stream=False)
        if self.imgsz is not None:
            kwargs["imgsz"] = self.imgsz
        with self._lock:
            self._captured.clear()
            try:
                results = self._yolo.predict(bgr, **kwargs)
                scores = self._take_scores(len(bgr))
            finally:
                self._captured.clear()
        if len(results) != len(bgr):
            raise RuntimeError(f"ultralytics returned {len(results)} results for {len(bgr)} images")
        convert = getattr(self, f"_regions_{self.task}")
        return [convert(r, None if scores is None else scores[i]) for i, r in enumerate(results)]

    def candidates(self, images: list[np.ndarray], low_conf: float = 0.05) -> list[list[Region]]:
        """Like `predict` with a low confidence threshold: regions between `low_conf` and the
        detector's `conf` carry extra["above_threshold"] = False (signals for miss-risk)."""
        return self.predict(images, conf=min(low_conf, self.conf))

    # --- raw class scores -----------------------------------------------------------------------

    def _take_scores(self, n: int):
        """Per-image (nc, anchors) class score tensors of the last call, or None."""
        if not self._captured:
            return None
        import torch

        try:
            scores = torch.cat(self._captured, 0)
        except RuntimeError:  # batches of different anchor counts: give up on class scores
            return None
        return scores if scores.shape[0] == n else None

    def _score_extras(self, scores, cls: int, conf: float) -> dict[str, Any]:
        """Find the anchor NMS kept (its winning score is exactly `conf`) and report its scores."""
        if scores is None:
            return {}
        hits = (scores[cls] == conf).nonzero()
        if len(hits) == 0:
            return {}
        vec = scores[:, int(hits[0, 0])].numpy().astype(np.float64)
        top = np.sort(vec)[::-1]
        margin = float(top[0] - top[1]) if len(top) > 1 else float(top[0])
        return {"class_scores": vec, "margin": margin}

    # --- conversion, one per task ---------------------------------------------------------------

    def _region(self, kind: str, geometry: Any, cls: int, score: float, extra: dict[str, Any]) -> Region:
        score = float(np.clip(score, 0.0, 1.0))
        extra = {"class_id": int(cls), "above_threshold": score >= self.conf, **extra}
        return Region(label=self.class_names.get(int(cls), str(cls)), kind=kind, geometry=geometry,
                      score=score, uncertainty=1.0 - score, extra=extra)

    @staticmethod
    def _box_rows(boxes):
        return (boxes.xyxy.cpu().numpy().astype(np.float64), boxes.conf.cpu().numpy(),
                boxes.cls.cpu().numpy().astype(int), boxes.conf.cpu())

    def _regions_detect(self, result, scores) -> list[Region]:
        if result.boxes is None or len(result.boxes) == 0:
            return []
        xyxy, conf, cls, conf_t = self._box_rows(result.boxes)
        return [self._region("box", (*map(float, xyxy[i]), 0.0), cls[i], conf[i],
                             self._score_extras(scores, cls[i], conf_t[i]))
                for i in range(len(xyxy))]

    def _regions_obb(self, result, scores) -> list[Region]:
        obb = result.obb
        if obb is None or len(obb) == 0:
            return []
        xywhr = obb.xywhr.cpu().numpy().astype(np.float64)
        corners = obb.xyxyxyxy.cpu().numpy().astype(np.float64)
        bounds = obb.xyxy.cpu().numpy().astype(np.float64)
        conf, cls, conf_t = obb.conf.cpu().numpy(), obb.cls.cpu().numpy().astype(int), obb.conf.cpu()
        regions = []
        for i in range(len(xywhr)):
            extra = {"corners": corners[i], "bounds": tuple(map(float, bounds[i])),
                     "xywhr": tuple(map(float, xywhr[i])), **self._score_extras(scores, cls[i], conf_t[i])}
            regions.append(self._region("box", rotated_box_from_xywhr(*xywhr[i]), cls[i], conf[i], extra))
        return regions

    def _regions_segment(self, result, scores) -> list[Region]:
        if result.boxes is None or len(result.boxes) == 0 or result.masks is None:
            return []
        xyxy, conf, cls, conf_t = self._box_rows(result.boxes)
        masks = _masks_to_original(result.masks.data, tuple(result.orig_shape[:2]))
        regions = []
        for i in range(len(xyxy)):
            polygon = _largest_outline(masks[i])
            if polygon is None:  # nothing left of the mask at the original size
                continue
            extra = {"mask": masks[i], "box": tuple(map(float, xyxy[i])),
                     **self._score_extras(scores, cls[i], conf_t[i])}
            regions.append(self._region("polygon", polygon, cls[i], conf[i], extra))
        return regions

    def _regions_pose(self, result, scores) -> list[Region]:
        if result.boxes is None or len(result.boxes) == 0 or result.keypoints is None:
            return []
        xyxy, conf, cls, conf_t = self._box_rows(result.boxes)
        kpts = result.keypoints.data.cpu().numpy().astype(np.float64)
        if kpts.shape[-1] == 2:  # trained without visibility
            kpts = np.concatenate([kpts, np.ones(kpts.shape[:-1] + (1,))], -1)
        regions = []
        for i in range(len(xyxy)):
            extra = {"box": tuple(map(float, xyxy[i])), "keypoint_names": self._kpt_names(cls[i], kpts.shape[1]),
                     **self._score_extras(scores, cls[i], conf_t[i])}
            regions.append(self._region("keypoints", kpts[i], cls[i], conf[i], extra))
        return regions

    def _regions_classify(self, result, scores) -> list[Region]:
        if result.probs is None:
            return []
        probs = result.probs.data.cpu().numpy().astype(np.float64)
        order = np.argsort(probs)[::-1]
        top1 = int(order[0])
        margin = float(probs[order[0]] - probs[order[1]]) if len(order) > 1 else float(probs[top1])
        return [self._region("class", None, top1, probs[top1], {"probs": probs, "margin": margin})]

    @property
    def keypoint_names(self) -> list[str]:
        """Every keypoint name the model knows (pose models trained with `kpt_names`), else []."""
        names = self._keypoint_names
        if isinstance(names, dict):
            return [str(n) for group in names.values() for n in group]
        return [str(n) for n in names] if names is not None else []

    def keypoint_names_for(self, cls: int) -> list[str]:
        """The names the regions of class `cls` give their keypoints (what a label spec needs before
        any region exists); [] for a model that is not a pose model."""
        inner = getattr(self._yolo, "model", None)
        shape = getattr(inner, "kpt_shape", None) or (getattr(inner, "yaml", None) or {}).get("kpt_shape")
        return self._kpt_names(cls, int(shape[0])) if self.task == "pose" and shape else []

    def _kpt_names(self, cls: int, k: int) -> list[str]:
        names = self._keypoint_names
        if isinstance(names, dict):
            names = names.get(int(cls))
        if names is not None and len(names) == k and not all(str(n) == str(j) for j, n in enumerate(names)):
            return [str(n) for n in names]
        return [f"kp{j}" for j in range(k)]  # none given (ultralytics' own default is "0".."K-1")


def _score_capture(store: list, nc: int):
    """A forward hook for a YOLO head that appends the (B, nc, anchors) class scores of its decoded
    output, (B, 4 + nc + extra, anchors), to `store`."""

    def hook(module, inputs, output) -> None:
        y = output
        while isinstance(y, (tuple, list)) and y:
            y = y[0]
        if getattr(y, "ndim", 0) == 3 and y.shape[1] >= 4 + nc:
            store.append(y[:, 4:4 + nc, :].detach().float().cpu())

    return hook


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def _masks_to_original(masks, shape: tuple[int, int]) -> np.ndarray:
    """Instance masks at the model's (letterboxed) input size -> bool (N, H, W) at the original size,
    in chunks so that large images do not need N full-size float masks at once."""
    from ultralytics.utils import ops

    h, w = shape
    n = int(masks.shape[0])
    out = np.zeros((n, h, w), dtype=bool)
    if tuple(masks.shape[1:]) == (h, w):  # already at the original size (retina masks)
        out[:] = masks.cpu().numpy() > 0.5
        return out
    step = max(1, _MASK_SCRATCH_BYTES // max(1, 4 * h * w))
    for i in range(0, n, step):
        chunk = masks[i:i + step].float()[None]  # (1, n, h', w')
        out[i:i + step] = (ops.scale_masks(chunk, (h, w))[0] > 0.5).cpu().numpy()
    return out


def _largest_outline(mask: np.ndarray) -> np.ndarray | None:
    """(N, 2) float (x, y) outline of the mask's largest part, through the centres of its boundary
    pixels, simplified by at most 1 px (less on small parts). None for an empty mask."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    c = max(contours, key=lambda k: (cv2.contourArea(k), len(k)))
    eps = min(1.0, 0.005 * cv2.arcLength(c, True))
    if len(c) > 8 and eps > 0:
        c = cv2.approxPolyDP(c, eps, True)
    return c.reshape(-1, 2).astype(np.float64) + 0.5
