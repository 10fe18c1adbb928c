"""Synthetic scenes with exact ground truth, for testing segmenters without any data set.

`make_scene`: a textured, unevenly lit background with clutter (small specks and thin lines),
several objects (ellipses, rounded rectangles, irregular but solid polygons) with clear edges,
mild shading and texture inside each object, some objects touching each other, a slight optical
blur and gaussian noise on top. Two small set pieces for interactive segmentation:
`make_touching_pair` (an L-shaped target with an intruder inside its box, for negative clicks) and
`make_touching_cells` (two look-alike round cells pressed together).

Everything is deterministic by seed. Modes:
  - "rgb":    (H, W, 3) uint8
  - "gray8":  (H, W) uint8
  - "gray16": (H, W) uint16 using only about 100..4000 of the range (like microscopy)

Ground truth is painted in order: an object's mask is its shape minus every object painted after
it, so masks never overlap and match the pixels exactly. Boxes are (x0, y0, x1, y1) in pixels with
x1, y1 exclusive (the box covers pixel columns x0..x1-1).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

MODES = ("rgb", "gray8", "gray16")


@dataclass(frozen=True)
class SceneObject:
    mask: np.ndarray  # bool (H, W)
    bbox: tuple[int, int, int, int]  # x0, y0, x1 (exclusive), y1 (exclusive)
    kind: str
    colour: tuple[float, float, float]

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass(frozen=True)
class Scene:
    image: np.ndarray
    objects: list[SceneObject]
    mode: str
    seed: int
    extra: dict = field(default_factory=dict)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return float((a & b).sum() / max(int((a | b).sum()), 1))


def bbox_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def interior_point(mask: np.ndarray) -> tuple[float, float]:
    """The (x, y) pixel centre deepest inside the mask (largest distance to its edge)."""
    dist = cv2.distanceTransform(np.pad(mask.astype(np.uint8), 1), cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return float(x) + 0.5, float(y) + 0.5


def interior_points(mask: np.ndarray, n: int, rng: np.random.Generator) -> list[tuple[float, float]]:
    """n random (x, y) points well inside the mask (at least half the maximal depth)."""
    dist = cv2.distanceTransform(np.pad(mask.astype(np.uint8), 1), cv2.DIST_L2, 5)[1:-1, 1:-1]
    ys, xs = np.nonzero(dist >= 0.5 * dist.max())
    idx = rng.choice(len(xs), size=min(n, len(xs)), replace=False)
    return [(float(xs[i]) + 0.5, float(ys[i]) + 0.5) for i in idx]


def jitter_box(bbox, rng: np.random.Generator, px: float = 3.0) -> tuple[float, float, float, float]:
    """The box with each side moved by up to `px` pixels (in or out), as a user would drag it."""
    x0, y0, x1, y1 = (float(v) + float(rng.uniform(-px, px)) for v in bbox)
    return x0, y0, max(x1, x0 + 2), max(y1, y0 + 2)


# --- drawing -------------------------------------------------------------------------------------

def _smooth_noise(rng, h, w, cell, amp) -> np.ndarray:
    """Low-frequency texture: coarse random values upsampled with cubic interpolation."""
    small = rng.normal(0, 1, (max(2, h // cell + 2), max(2, w // cell + 2))).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC) * amp


def _shape_mask(rng, h, w, kind, cx, cy, r) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    if kind == "ellipse":
        axes = (int(r), int(r * rng.uniform(0.55, 1.0)))
        cv2.ellipse(m, (int(cx), int(cy)), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1, cv2.LINE_8)
    elif kind == "rounded_rect":
        hw, hh = r, r * rng.uniform(0.5, 1.0)
        rad = min(hw, hh) * rng.uniform(0.15, 0.5)
        rect = np.zeros((int(2 * hh) + 3, int(2 * hw) + 3), np.uint8)
        x0, y0, x1, y1 = 1, 1, rect.shape[1] - 2, rect.shape[0] - 2
        ri = int(rad)
        cv2.rectangle(rect, (x0 + ri, y0), (x1 - ri, y1), 1, -1)
        cv2.rectangle(rect, (x0, y0 + ri), (x1, y1 - ri), 1, -1)
        for px, py in ((x0 + ri, y0 + ri), (x1 - ri, y0 + ri), (x0 + ri, y1 - ri), (x1 - ri, y1 - ri)):
            cv2.circle(rect, (px, py), ri, 1, -1)
        angle = float(rng.uniform(0, 180))
        side = int(np.ceil(np.hypot(*rect.shape))) + 2
        canvas = np.zeros((side, side), np.uint8)
        oy, ox = (side - rect.shape[0]) // 2, (side - rect.shape[1]) // 2
        canvas[oy:oy + rect.shape[0], ox:ox + rect.shape[1]] = rect
        rot = cv2.getRotationMatrix2D((side / 2, side / 2), angle, 1.0)
        rot[:, 2] += (cx - side / 2, cy - side / 2)
        m = cv2.warpAffine(canvas, rot, (w, h), flags=cv2.INTER_NEAREST)
    else:  # polygon: an irregular star-shaped polygon with 5..9 vertices
        n = int(rng.integers(5, 10))
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        rad = r * rng.uniform(0.6, 1.0, n)
        pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1)
        cv2.fillPoly(m, [np.round(pts).astype(np.int32)], 1)
    return m.astype(bool)


def _compact(shape: np.ndarray, r: float) -> bool:
    """Objects, not slivers: solid (area >= 80% of the convex hull) and thick (inscribed radius
    >= 30% of the nominal radius), which rules out needles and bow-ties from the random polygons."""
    u8 = shape.astype(np.uint8)
    contours, _ = cv2.findContours(u8, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    hull = cv2.contourArea(cv2.convexHull(np.vstack(contours)))
    depth = cv2.distanceTransform(np.pad(u8, 1), cv2.DIST_L2, 5).max()
    return shape.sum() >= 0.8 * hull and depth >= 0.3 * r


def _colour_far_from(rng, avoid, mode, min_dist) -> np.ndarray:
    best, best_d = None, -1.0
    for _ in range(200):
        if mode == "rgb":
            c = rng.uniform(20, 235, 3)
        else:
            c = np.repeat(rng.uniform(20, 235), 3)
        d = min((float(np.linalg.norm(c - a)) / (1.0 if mode == "rgb" else np.sqrt(3)) for a in avoid),
                default=1e9)
        if d >= min_dist:
            return c
        if d > best_d:
            best, best_d = c, d
    return best


def _finish(canvas: np.ndarray, rng, mode: str, noise: float, blur: float) -> np.ndarray:
    if blur > 0:  # optics: edges are never a one-pixel step
        canvas = cv2.GaussianBlur(canvas, (0, 0), blur)
    if mode == "rgb":
        img = canvas + rng.normal(0, noise, canvas.shape)
        return np.clip(img, 0, 255).astype(np.uint8)
    gray = canvas[:, :, 0]
    if mode == "gray8":
        return np.clip(gray + rng.normal(0, noise, gray.shape), 0, 255).astype(np.uint8)
    if mode == "gray16":
        g = 100 + gray * 15.0  # 0..255 -> 100..3925
        return np.clip(g + rng.normal(0, noise * 15.0, g.shape), 0, 65535).astype(np.uint16)
    raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")


def make_scene(seed: int, size: tuple[int, int] = (384, 512), n_objects: int = 6, mode: str = "rgb",
               noise: float = 10.0, blur: float = 1.0, clutter: int = 25, touching: float = 0.35,
               radius: tuple[float, float] = (0.06, 0.16), min_contrast: float = 45.0) -> Scene:
    """A random scene of `n_objects` objects; see the module docstring.

    radius: object size range as a fraction of min(H, W). touching: the probability that an object
    is placed right against an earlier one. min_contrast: minimal colour distance (0..255 scale, per
    grey level in gray modes) between an object and the background and the object it touches.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")
    rng = np.random.default_rng(seed)
    h, w = size
    base = rng.uniform(60, 190, 3) if mode == "rgb" else np.repeat(rng.uniform(60, 190), 3)
    canvas = np.empty((h, w, 3), np.float32)
    canvas[:] = base
    light = _smooth_noise(rng, h, w, max(h, w) // 2, 10.0)
    canvas += light[:, :, None]
    texture = _smooth_noise(rng, h, w, 12, 6.0)
    canvas += texture[:, :, None] if mode != "rgb" else np.stack(
        [texture, _smooth_noise(rng, h, w, 12, 6.0), _smooth_noise(rng, h, w, 12, 6.0)], 2)

    # Clutter in the background: specks and thin lines with colours near and far from the objects.
    for _ in range(clutter):
        c = rng.uniform(0, 255, 3) if mode == "rgb" else np.repeat(rng.uniform(0, 255), 3)
        if rng.random() < 0.6:
            cv2.circle(canvas, (int(rng.integers(0, w)), int(rng.integers(0, h))), int(rng.integers(1, 5)),
                       c.tolist(), -1)
        else:
            p0 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            p1 = (p0[0] + int(rng.integers(-60, 60)), p0[1] + int(rng.integers(-60, 60)))
            cv2.line(canvas, p0, p1, c.tolist(), int(rng.integers(1, 3)))

    shapes: list[np.ndarray] = []
    kinds, colours = [], []
    occupied = np.zeros((h, w), bool)
    side = min(h, w)
    for _ in range(n_objects):
        for _attempt in range(60):
            r = rng.uniform(*radius) * side
            kind = str(rng.choice(["ellipse", "rounded_rect", "polygon"]))
            if shapes and rng.random() < touching:
                # Against an earlier object: start at its centre and slide away until barely clear.
                j = int(rng.integers(len(shapes)))
                ys, xs = np.nonzero(shapes[j])
                cx0, cy0 = xs.mean(), ys.mean()
                a = rng.uniform(0, 2 * np.pi)
                shape = None
                for step in np.arange(r * 0.5, side, 2.0):
                    cx, cy = cx0 + step * np.cos(a), cy0 + step * np.sin(a)
                    cand = _shape_mask(rng, h, w, kind, cx, cy, r)
                    if not (cand & occupied).any():
                        shape = cand
                        break
                if shape is None:
                    continue
                neighbour = [colours[j]]
            else:
                cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
                shape = _shape_mask(rng, h, w, kind, cx, cy, r)
                grown = cv2.dilate(occupied.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
                if (shape & grown).any():
                    continue
                neighbour = []
            on_edge = shape[0].any() or shape[-1].any() or shape[:, 0].any() or shape[:, -1].any()
            if shape.sum() < 80 or on_edge:
                continue
            if not _compact(shape, r):
                continue
            colour = _colour_far_from(rng, [base] + neighbour, mode, min_contrast)
            shapes.append(shape)
            kinds.append(kind)
            colours.append(colour)
            occupied |= shape
            break

    # Paint objects with mild shading and fine texture of their own.
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for shape, colour in zip(shapes, colours):
        ys, xs = np.nonzero(shape)
        gx, gy = rng.normal(0, 1, 2)
        span = max(int(np.ptp(xs)), int(np.ptp(ys)), 1)
        shade = ((xx - xs.mean()) * gx + (yy - ys.mean()) * gy) / span * 8.0
        fine = _smooth_noise(rng, h, w, 6, 3.0)
        canvas[shape] = colour + (shade + fine)[shape][:, None]

    objects = []
    for i, (shape, kind, colour) in enumerate(zip(shapes, kinds, colours)):
        mask = shape.copy()
        for later in shapes[i + 1:]:
            mask &= ~later
        objects.append(SceneObject(mask, bbox_of(mask), kind, tuple(float(c) for c in colour)))
    return Scene(_finish(canvas, rng, mode, noise, blur), objects, mode, seed)


def make_touching_pair(seed: int, size: tuple[int, int] = (256, 256), mode: str = "rgb",
                       intruder: str = "object", noise: float = 10.0, blur: float = 1.0) -> Scene:
    """An L-shaped target (a bracket on a table) with an 'intruder' in the notch of the L.

    objects[0] is the target and objects[1] the intruder, which touches both arms of the L and lies
    inside the target's box: another object ("object", a disc) or a patch of the background with
    its own colour ("patch", a stain the target lies on). Since the intruder's colour appears
    nowhere outside the target's box, a box prompt alone takes it in; a negative click on it should
    remove it.
    """
    rng = np.random.default_rng(seed)
    h, w = size
    base = rng.uniform(60, 190, 3) if mode == "rgb" else np.repeat(rng.uniform(60, 190), 3)
    canvas = np.empty((h, w, 3), np.float32)
    canvas[:] = base
    canvas += _smooth_noise(rng, h, w, 12, 5.0)[:, :, None]
    bw, bh = rng.uniform(0.5, 0.65) * w, rng.uniform(0.5, 0.65) * h
    x0, y0 = rng.uniform(0.1 * w, 0.9 * w - bw), rng.uniform(0.1 * h, 0.9 * h - bh)
    x1, y1 = x0 + bw, y0 + bh
    nx, ny = x0 + bw * rng.uniform(0.45, 0.55), y0 + bh * rng.uniform(0.45, 0.55)  # inner corner
    target = np.zeros((h, w), np.uint8)
    cv2.rectangle(target, (int(x0), int(y0)), (int(x1), int(y1)), 1, -1)
    corner = [(x0, y0), (x1, y0), (x0, y1), (x1, y1)][int(rng.integers(4))]  # the notch's corner
    cv2.rectangle(target, (int(corner[0]), int(corner[1])), (int(nx), int(ny)), 0, -1)
    target = target.astype(bool)
    # The intruder sits in the notch, pressed against its inner corner.
    qx, qy = abs(corner[0] - nx), abs(corner[1] - ny)
    dx, dy = np.sign(corner[0] - nx), np.sign(corner[1] - ny)
    blob = np.zeros((h, w), np.uint8)
    if intruder == "object":
        r = 0.42 * min(qx, qy)
        cv2.circle(blob, (int(nx + dx * (r - 2)), int(ny + dy * (r - 2))), int(r), 1, -1)
    else:
        f = rng.uniform(0.6, 0.8, 4)
        pts = np.array([[nx - dx * 2, ny - dy * 2], [nx + dx * qx * f[0], ny - dy * 2],
                        [nx + dx * qx * f[1], ny + dy * qy * f[2]], [nx - dx * 2, ny + dy * qy * f[3]]])
        cv2.fillPoly(blob, [np.round(pts).astype(np.int32)], 1)
    blob = blob.astype(bool)
    t_col = _colour_far_from(rng, [base], mode, 70.0)
    i_col = _colour_far_from(rng, [base, t_col], mode, 55.0)
    if intruder == "object":
        canvas[target] = t_col
        canvas[blob] = i_col  # the intruder object lies on top of the target
        t_mask = target & ~blob
    else:
        canvas[blob] = i_col  # the stain is background: the target lies on top of it
        canvas[target] = t_col
        t_mask = target
    canvas[t_mask] += _smooth_noise(rng, h, w, 6, 3.0)[t_mask][:, None]
    i_mask = blob & ~t_mask
    objects = [SceneObject(t_mask, bbox_of(t_mask), "L", tuple(map(float, t_col))),
               SceneObject(i_mask, bbox_of(i_mask), intruder, tuple(map(float, i_col)))]
    return Scene(_finish(canvas, rng, mode, noise, blur), objects, mode, seed, extra={"intruder": intruder})


def make_touching_cells(seed: int, size: tuple[int, int] = (256, 256), mode: str = "gray8",
                        noise: float = 8.0, blur: float = 1.0) -> Scene:
    """Two round cells of (nearly) the same shade pressed against each other, as in microscopy.

    Only their shapes tell them apart: a click on one should give that one.
    """
    rng = np.random.default_rng(seed)
    h, w = size
    base = rng.uniform(60, 120)
    canvas = np.full((h, w, 3), base, np.float32) + _smooth_noise(rng, h, w, 12, 5.0)[:, :, None]
    r1, r2 = rng.uniform(0.12, 0.18, 2) * min(h, w)
    ang, overlap = rng.uniform(0, 2 * np.pi), rng.uniform(0, 6)
    u = np.array([np.cos(ang), np.sin(ang)])
    c1 = np.array([w / 2, h / 2]) - (r1 - overlap / 2) * u
    c2 = np.array([w / 2, h / 2]) + (r2 - overlap / 2) * u
    shade = rng.uniform(base + 60, 235)
    masks = []
    for c, r, tone in ((c1, r1, shade), (c2, r2, shade + rng.uniform(-8, 8))):
        m = np.zeros((h, w), np.uint8)
        cv2.circle(m, (int(round(c[0])), int(round(c[1]))), int(round(r)), 1, -1)
        canvas[m > 0] = tone
        masks.append(m.astype(bool))
    colour = (shade,) * 3 if mode != "rgb" else (shade, shade * 0.8, shade * 0.9)
    if mode == "rgb":
        canvas *= np.array([1.0, 0.8, 0.9], np.float32)
    first = masks[0] & ~masks[1]  # the second cell lies on top where they overlap
    objects = [SceneObject(first, bbox_of(first), "cell", tuple(map(float, colour))),
               SceneObject(masks[1], bbox_of(masks[1]), "cell", tuple(map(float, colour)))]
    return Scene(_finish(canvas, rng, mode, noise, blur), objects, mode, seed)
