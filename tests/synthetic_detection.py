"""Synthetic detection scenes with exact ground truth, and a writer for ultralytics data sets.

A scene is a textured, unevenly lit background with clutter (specks, thin lines, crosses and hollow
rings in random colours: things a detector must learn to ignore), several objects of three classes
and gaussian noise on top:

  - "disc":     a filled circle, warm colours (reds, oranges)
  - "square":   a filled square at a random rotation, greens
  - "triangle": a filled equilateral triangle at a random rotation, blues

Colour is a strong but not the only cue: the clutter uses every colour, and the gray modes keep only
the shapes. Objects never overlap (they keep a gap of a few pixels), lie fully inside the image,
and some are small (shorter side under 32 px).

Everything is deterministic by seed. Modes: "rgb" (H, W, 3) uint8, "gray8" (H, W) uint8, "gray16"
(H, W) uint16 using only about 100..4000 of the range.

Coordinates are pixels with the pixel-edge convention: pixel column i covers x in [i, i + 1). Per
object, exactly:
  - `polygon`: the outline drawn, (N, 2) float (x, y) (a 48-gon for discs);
  - `mask`: the pixels painted for it (the polygon rasterised), bool (H, W);
  - `box`: (x0, y0, x1, y1) of the mask, x1 and y1 exclusive;
  - `keypoints`: (3, 2) float (x, y) of the outline's topmost, leftmost and rightmost vertices (for a
    disc the top, left and right extreme points of the circle); names in KEYPOINT_NAMES;
  - `obb`: (4, 2) float corners of the minimum-area rotated rectangle around the outline (for a
    square, its own corners).

`write_yolo_dataset` writes such scenes as an ultralytics data set for the tasks detect, segment,
pose, obb (labels/*.txt beside images/, and a data.yaml) or classify (one folder per class of
object crops), so a tiny YOLO can be trained from an architecture file (yolov8n.yaml etc.) with
nothing downloaded.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

CLASSES = ("disc", "square", "triangle")
KEYPOINT_NAMES = ("top", "left", "right")
#: How keypoints swap under a horizontal flip (ultralytics' flip_idx): left <-> right.
FLIP_IDX = (0, 2, 1)
MODES = ("rgb", "gray8", "gray16")
TASKS = ("detect", "segment", "pose", "obb", "classify")

# Hue bands (OpenCV hue, 0..180) per class.
_HUES = {"disc": (0, 18), "square": (45, 80), "triangle": (100, 125)}


@dataclass(frozen=True)
class DetObject:
    cls: int
    polygon: np.ndarray  # (N, 2) float (x, y)
    mask: np.ndarray  # bool (H, W)
    box: tuple[int, int, int, int]  # x0, y0, x1 (exclusive), y1 (exclusive)
    keypoints: np.ndarray  # (3, 2) float (x, y): top, left, right
    obb: np.ndarray  # (4, 2) float corners

    @property
    def name(self) -> str:
        return CLASSES[self.cls]

    @property
    def size(self) -> int:
        """The shorter side of the box, in pixels."""
        return min(self.box[2] - self.box[0], self.box[3] - self.box[1])


@dataclass(frozen=True)
class DetScene:
    image: np.ndarray
    objects: list[DetObject]
    mode: str
    seed: int

    def boxes(self) -> np.ndarray:
        return np.asarray([o.box for o in self.objects], dtype=np.float64).reshape(-1, 4)

    def classes(self) -> np.ndarray:
        return np.asarray([o.cls for o in self.objects], dtype=np.int64)


# --- geometry -----------------------------------------------------------------------------------

def _outline(kind: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """The outline of a shape of 'radius' r (circumradius for polygons), as (N, 2) (x, y)."""
    if kind == "disc":
        t = np.arange(48) * (2 * np.pi / 48)  # vertices at 0, 90, 180, 270 degrees: exact extremes
        return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)
    n = 4 if kind == "square" else 3
    t = angle + np.arange(n) * (2 * np.pi / n)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)


def _extreme_keypoints(poly: np.ndarray) -> np.ndarray:
    top = poly[np.lexsort((poly[:, 0], poly[:, 1]))[0]]  # smallest y, then smallest x
    left = poly[np.lexsort((poly[:, 1], poly[:, 0]))[0]]  # smallest x, then smallest y
    right = poly[np.lexsort((poly[:, 1], -poly[:, 0]))[0]]  # largest x, then smallest y
    return np.stack([top, left, right]).astype(np.float64)


def _rasterise(poly: np.ndarray, h: int, w: int) -> np.ndarray:
    """Fill a polygon given in pixel-edge coordinates (OpenCV draws in pixel-centre ones)."""
    m = np.zeros((h, w), np.uint8)
    pts = np.round((poly - 0.5) * 16).astype(np.int32)  # 4 fractional bits
    cv2.fillPoly(m, [pts], 1, lineType=cv2.LINE_8, shift=4)
    return m.astype(bool)


def _min_area_corners(poly: np.ndarray) -> np.ndarray:
    return cv2.boxPoints(cv2.minAreaRect(poly.astype(np.float32))).astype(np.float64)


def bbox_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of (N, 4) and (M, 4) boxes (x0, y0, x1, y1) -> (N, M)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def match_detections(gt_boxes, gt_classes, pred_boxes, pred_classes, iou_thr: float = 0.5):
    """Greedy one-to-one matching (predictions in the given order, e.g. by score) at IoU >= iou_thr
    with equal class. Returns (true positives, number of predictions, number of ground truths)."""
    gt_boxes = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
    pred_boxes = np.asarray(pred_boxes, np.float64).reshape(-1, 4)
    if len(gt_boxes) == 0 or len(pred_boxes) == 0:
        return 0, len(pred_boxes), len(gt_boxes)
    iou = box_iou(pred_boxes, gt_boxes)
    same = np.asarray(pred_classes)[:, None] == np.asarray(gt_classes)[None, :]
    iou = np.where(same, iou, 0.0)
    used = np.zeros(len(gt_boxes), bool)
    tp = 0
    for i in range(len(pred_boxes)):
        cand = np.where(used, -1.0, iou[i])
        j = int(np.argmax(cand))
        if cand[j] >= iou_thr:
            used[j] = True
            tp += 1
    return tp, len(pred_boxes), len(gt_boxes)


# --- drawing ------------------------------------------------------------------------------------

def _smooth_noise(rng, h, w, cell, amp) -> np.ndarray:
    small = rng.normal(0, 1, (max(2, h // cell + 2), max(2, w // cell + 2))).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC) * amp


def _class_colour(rng, name: str) -> np.ndarray:
    lo, hi = _HUES[name]
    hsv = np.uint8([[[rng.uniform(lo, hi), rng.uniform(150, 255), rng.uniform(150, 255)]]])
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _clutter(rng, canvas: np.ndarray, n: int) -> None:
    h, w = canvas.shape[:2]
    for _ in range(n):
        c = rng.uniform(0, 255, 3).tolist()
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        kind = rng.random()
        if kind < 0.4:  # speck
            cv2.circle(canvas, (x, y), int(rng.integers(1, 4)), c, -1)
        elif kind < 0.7:  # thin line
            p1 = (x + int(rng.integers(-50, 50)), y + int(rng.integers(-50, 50)))
            cv2.line(canvas, (x, y), p1, c, int(rng.integers(1, 3)))
        elif kind < 0.85:  # cross
            s = int(rng.integers(4, 12))
            cv2.line(canvas, (x - s, y), (x + s, y), c, 2)
            cv2.line(canvas, (x, y - s), (x, y + s), c, 2)
        else:  # hollow ring: disc-like outline, not a disc
            cv2.circle(canvas, (x, y), int(rng.integers(5, 16)), c, 1)


def _finish(canvas: np.ndarray, rng, mode: str, noise: float, blur: float) -> np.ndarray:
    if blur > 0:
        canvas = cv2.GaussianBlur(canvas, (0, 0), blur)
    if mode == "rgb":
        return np.clip(canvas + rng.normal(0, noise, canvas.shape), 0, 255).astype(np.uint8)
    gray = canvas @ np.float32([0.299, 0.587, 0.114])
    if mode == "gray8":
        return np.clip(gray + rng.normal(0, noise, gray.shape), 0, 255).astype(np.uint8)
    g = 100 + gray * 15.0  # 0..255 -> 100..3925
    return np.clip(g + rng.normal(0, noise * 15.0, g.shape), 0, 65535).astype(np.uint16)


def make_detection_scene(seed: int, size: int | tuple[int, int] = 192, n_objects: tuple[int, int] = (3, 7),
                         mode: str = "rgb", small_fraction: float = 0.3, noise: float = 6.0,
                         blur: float = 0.6, clutter: int = 12) -> DetScene:
    """A random scene; see the module docstring. size: side or (height, width).

    n_objects: inclusive range of how many objects to try to place (fewer when the image is full).
    small_fraction: the share of objects whose box side is under 32 px.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    rng = np.random.default_rng(seed)
    base = rng.uniform(50, 200) + rng.normal(0, 12, 3)  # grey with a tint: objects stand out by hue
    canvas = np.empty((h, w, 3), np.float32)
    canvas[:] = base
    canvas += _smooth_noise(rng, h, w, max(h, w) // 2, 15.0)[:, :, None]  # uneven light
    canvas += np.stack([_smooth_noise(rng, h, w, 8, 7.0) for _ in range(3)], 2)  # texture
    _clutter(rng, canvas, clutter)

    side = min(h, w)
    r_small, r_large = (7.0, 14.0), (15.0, max(16.0, 0.2 * side))
    occupied = np.zeros((h, w), bool)
    objects: list[DetObject] = []
    for _ in range(int(rng.integers(n_objects[0], n_objects[1] + 1))):
        for _attempt in range(40):
            cls = int(rng.integers(len(CLASSES)))
            name = CLASSES[cls]
            r = rng.uniform(*(r_small if rng.random() < small_fraction else r_large))
            if name == "disc":
                r *= 0.8  # a disc of the same radius looks bigger than a triangle
            cx, cy = rng.uniform(r + 1, w - r - 1), rng.uniform(r + 1, h - r - 1)
            poly = _outline(name, cx, cy, r, rng.uniform(0, 2 * np.pi))
            mask = _rasterise(poly, h, w)
            if mask.sum() < 20:
                continue
            grown = cv2.dilate(occupied.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
            if (mask & grown).any():
                continue
            occupied |= mask
            colour = _class_colour(rng, name)
            ys, xs = np.nonzero(mask)
            g = rng.normal(0, 1, 2)
            shade = ((xs - xs.mean()) * g[0] + (ys - ys.mean()) * g[1]) / max(r, 1.0) * 10.0
            canvas[ys, xs] = colour + shade[:, None]
            objects.append(DetObject(cls, poly, mask, bbox_of(mask), _extreme_keypoints(poly),
                                     _min_area_corners(poly)))
            break
    return DetScene(_finish(canvas, rng, mode, noise, blur), objects, mode, seed)


# --- ultralytics data sets ----------------------------------------------------------------------

def _label_lines(scene: DetScene, task: str) -> list[str]:
    h, w = scene.image.shape[:2]
    scale = np.array([w, h], np.float64)
    lines = []
    for o in scene.objects:
        x0, y0, x1, y1 = o.box
        xywh = [(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h]
        if task == "detect":
            vals = xywh
        elif task == "segment":
            vals = np.clip(o.polygon / scale, 0, 1).ravel().tolist()
        elif task == "pose":
            kp = np.clip(o.keypoints / scale, 0, 1)
            vals = xywh + np.concatenate([kp, np.full((len(kp), 1), 2.0)], 1).ravel().tolist()
        elif task == "obb":
            vals = np.clip(o.obb / scale, 0, 1).ravel().tolist()
        else:
            raise ValueError(f"no label lines for task {task!r}")
        lines.append(" ".join([str(o.cls)] + [f"{v:.6f}" for v in vals]))
    return lines


def _write_image(path: Path, image: np.ndarray) -> None:
    img = image[:, :, ::-1] if image.ndim == 3 else image  # OpenCV writes BGR
    if not cv2.imwrite(str(path), np.ascontiguousarray(img)):
        raise OSError(f"cannot write {path}")


def write_yolo_dataset(root: str | Path, n_train: int = 60, n_val: int = 20, size: int | tuple[int, int] = 192,
                       task: str = "detect", seed: int = 0, **scene_kw) -> Path:
    """Write `n_train` + `n_val` scenes under `root` for an ultralytics task; return what to pass as
    `data=` to `YOLO(...).train` (data.yaml, or the root folder for classify).

    detect/segment/pose/obb: root/images/{train,val}/*.png, root/labels/{train,val}/*.txt (YOLO
    format, normalised), root/data.yaml with an absolute `path`, `train`, `val`, `names` (and
    `kpt_shape`, `flip_idx`, `kpt_names` for pose). classify: root/{train,val}/<class>/*.png, one
    crop per object (with a margin of a quarter of its size). Scenes are rgb unless scene_kw
    says otherwise (gray images are written as single-channel PNGs).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {TASKS}")
    root = Path(root).resolve()
    for split, n, offset in (("train", n_train, 0), ("val", n_val, 1_000_000)):
        if task == "classify":
            for name in CLASSES:
                (root / split / name).mkdir(parents=True, exist_ok=True)
        else:
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            scene = make_detection_scene(seed * 10_000_000 + offset + i, size, **scene_kw)
            stem = f"{i:06d}"
            if task == "classify":
                h, w = scene.image.shape[:2]
                for k, o in enumerate(scene.objects):
                    x0, y0, x1, y1 = o.box
                    m = max(2, (max(x1 - x0, y1 - y0)) // 4)
                    crop = scene.image[max(0, y0 - m):min(h, y1 + m), max(0, x0 - m):min(w, x1 + m)]
                    _write_image(root / split / o.name / f"{stem}_{k}.png", crop)
                continue
            _write_image(root / "images" / split / f"{stem}.png", scene.image)
            text = "\n".join(_label_lines(scene, task))
            (root / "labels" / split / f"{stem}.txt").write_text(text + ("\n" if text else ""))
    if task == "classify":
        return root
    import yaml

    data = {"path": str(root), "train": "images/train", "val": "images/val",
            "names": {i: n for i, n in enumerate(CLASSES)}}
    if task == "pose":
        data["kpt_shape"] = [len(KEYPOINT_NAMES), 3]
        data["flip_idx"] = list(FLIP_IDX)
        data["kpt_names"] = {i: list(KEYPOINT_NAMES) for i in range(len(CLASSES))}
    path = root / "data.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
