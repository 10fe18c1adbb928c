"""GrabCut: the weight-free, classical interactive segmenter (OpenCV only, nothing to download).

It does not know what an object is. It finds a region whose colours differ from its surroundings
and whose outline runs along image edges. That works well for objects with clear edges (cells,
coins, parts on a table) and poorly for objects with weak edges or made of many different parts
(people, animals, scenes: use SAM there). Touching objects of similar colour are told apart only
by their shape (a neck between round bodies); otherwise they need a box or a negative click.

embed (once per image, cacheable): the image as RGB uint8 (gray and 16-bit stretched by
`to_rgb8`), shrunk so its longer side is at most `max_side`, then smoothed by a bilateral filter
(edge-preserving) whose strength follows the image's estimated noise level. Gray images also get
two blurred copies of themselves as extra channels for GrabCut (see `embed`).

segment (per click, on a region of interest around the prompt, never the whole image):
  1. Extent. A box gives it. Positive clicks without a box first grow a colour-similar region
     around each click (`_stable_region`: flood fills at a series of colour tolerances, keeping
     the region whose outline best follows edges before it leaks); GrabCut may then reach a
     little beyond that region, and if the result presses against that limit the region grows
     and GrabCut runs again (at most twice).
  2. Seeds. Around a box: outside is certain background (a thin ring just outside the box only
     probable background, which forgives a box drawn a little tight), inside is probable object.
     Positive clicks are certain object. Negative clicks are certain background, and so is the
     colour-similar region grown from each of them (never taking a positive click or more than
     40 % of the probable object).
  3. cv2.grabCut (colour GMMs + graph cut), on the region of interest shrunk to `roi_side`
     pixels, one iteration at a time: it stops when the mask settles, and a collapse (colour
     models that explain the object as background) falls back to the grown region.
  4. Clean-up: keep the connected parts holding a positive click (else the largest), fill small
     holes; without a box, also split off a look-alike touching the clicked object across a neck
     (two touching cells: one core each after an erosion, pixels go to the nearest core). Then
     upsample to the original resolution.

The score (0..1) is measured on the result: how the edge strength along the mask's outline ranks
among the edge strengths around it (outline on the strongest edges: 1; through texture or
noise: 0). It drops when GrabCut still pressed against its limit or when the mask runs along much
of the image border (background, most likely).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from ..image import to_rgb8
from ..types import Prompt, Region
from .base import Embedding, Segmenter, mask_region

_FLOOD_TOLERANCES = (4, 6, 8, 11, 14, 18, 23, 29, 36, 45, 56, 70, 88, 110)  # Lab distances (8-bit Lab)


@dataclass(frozen=True)
class _Work:
    image: np.ndarray  # smoothed RGB uint8 at working size (h, w, 3); read-only
    features: np.ndarray  # what GrabCut models: `image`, or for gray images three scales of it
    scale: tuple[float, float]  # (sx, sy): working pixels per original pixel


def _noise_sigma(gray: np.ndarray) -> float:
    """Immerkaer (1996): noise sigma from the response to a Laplacian-difference kernel."""
    if min(gray.shape) < 3:
        return 0.0
    k = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)
    resp = cv2.filter2D(gray.astype(np.float32), -1, k)[1:-1, 1:-1]
    return float(math.sqrt(math.pi / 2) * np.abs(resp).mean() / 6.0)


def _lab(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2Lab).astype(np.float32)


def _stable_region(lab: np.ndarray, seed: tuple[int, int], open_sides=(False,) * 4, accept=None,
                   with_side: bool = False):
    """The colour-similar connected region around `seed` (x, y) of a Lab crop that best fits edges.

    Flood fills (4-connected) the pixels within colour distance t of the seed's neighbourhood, for
    a growing series of t: small t gives a ragged part of the object, large t leaks into whatever
    touches it. Each region is rated by the mean edge strength along its outline, and the best
    rated one wins among those before a leak: the area jumping by 30 % once the rating has levelled
    off well above the noise, or by 150 % later on. A region reaching an 'open' side of the crop
    (x0, y0, x1, y1: one that is not an image edge) leaked out of the window, and `accept(mask)`
    may refuse more; regions being nested, the series ends at either. None if nothing qualified;
    with `with_side`, (region, whether an open side stopped it).
    """
    h, w = lab.shape[:2]
    x, y = seed
    lab = cv2.GaussianBlur(lab, (0, 0), 1.5)  # the region only needs to be roughly right: quiet noise
    grad = _gradient(lab)
    floor = 5.0 * float(np.median(grad[::2, ::2]))  # outlines below this run through noise, not edges
    patch = lab[max(0, y - 2):y + 3, max(0, x - 2):x + 3].reshape(-1, 3)
    shift = np.hstack([np.eye(3, dtype=np.float32), -np.median(patch, axis=0)[:, None].astype(np.float32)])
    dist = _norm(cv2.transform(lab, shift))  # Lab distance to the seed colour (cv2: fast)
    dist = np.clip(dist, 0, 254).astype(np.uint8)
    dist[y, x] = 0
    flags = 4 | cv2.FLOODFILL_FIXED_RANGE | cv2.FLOODFILL_MASK_ONLY | (1 << 8)
    best, best_fit, top, prev_area, prev_fit, seen = None, -1.0, 0.0, 0, 0.0, 0
    levelled = hit_side = False
    for t in _FLOOD_TOLERANCES:
        m = np.zeros((h + 2, w + 2), np.uint8)
        area, _, _, (rx, ry, rw, rh) = cv2.floodFill(dist, m, (x, y), 0, 0, t, flags)
        region = m[1:-1, 1:-1]
        if ((open_sides[0] and rx == 0) or (open_sides[1] and ry == 0)
                or (open_sides[2] and rx + rw == w) or (open_sides[3] and ry + rh == h)):
            hit_side = True
            break
        if accept is not None and not accept(region.astype(bool)):
            break
        if seen and (area > 2.5 * prev_area and seen >= 2 or area > 1.3 * prev_area and levelled):
            break  # a leak (the first region may still jump: that is noise filling in)
        # Mean edge strength along the region's outline (within its bounding rectangle + 1).
        sub = region[max(0, ry - 1):ry + rh + 1, max(0, rx - 1):rx + rw + 1]
        outline = (sub - cv2.erode(sub, np.ones((3, 3), np.uint8), borderValue=0)).astype(bool)
        fit = float(grad[max(0, ry - 1):ry + rh + 1, max(0, rx - 1):rx + rw + 1][outline].mean()) \
            if outline.any() else 0.0
        if area >= 12:
            top = max(top, fit)
            levelled = seen > 0 and fit >= 0.9 * top and fit <= 1.1 * prev_fit and fit >= floor
            seen += 1
            if fit > best_fit:
                best, best_fit = region.copy(), fit
        prev_area, prev_fit = area, fit
    best = None if best is None else best.astype(bool)
    return (best, hit_side) if with_side else best


def _gradient(lab: np.ndarray) -> np.ndarray:
    """Colour gradient magnitude (Lab units per pixel), max-filtered over 3x3 to forgive offsets."""
    gx = cv2.Sobel(lab, cv2.CV_32F, 1, 0, ksize=3, scale=0.125)
    gy = cv2.Sobel(lab, cv2.CV_32F, 0, 1, ksize=3, scale=0.125)
    return cv2.dilate(_norm(gx, gy), np.ones((3, 3), np.uint8))


def _norm(*vectors: np.ndarray) -> np.ndarray:
    """Per-pixel Euclidean norm over the channels of one or more float32 3-channel images."""
    sq = sum(cv2.multiply(v, v) for v in vectors)
    return cv2.sqrt(cv2.transform(sq, np.ones((1, 3), np.float32)))


class GrabCutSegmenter(Segmenter):
    """Classical interactive segmentation: OpenCV GrabCut seeded by boxes and clicks (no weights)."""

    model_id = "grabcut-v1"

    def __init__(self, max_side: int = 1024, roi_side: int = 240, iterations: int = 4):
        self.max_side = int(max_side)
        self.roi_side = int(roi_side)
        self.iterations = int(iterations)
        if (self.max_side, self.roi_side, self.iterations) != (1024, 240, 4):
            # Other settings give other embeddings and masks: keep their cache keys apart.
            self.model_id = f"grabcut-v1-{self.max_side}-{self.roi_side}-{self.iterations}"
        cv2.cvtColor(np.zeros((1, 1, 3), np.uint8), cv2.COLOR_RGB2Lab)  # OpenCV builds Lab tables once

    def describe(self) -> dict:
        return {**super().describe(), "max_side": self.max_side, "roi_side": self.roi_side,
                "iterations": self.iterations}

    # --- per image -------------------------------------------------------------------------------

    def embed(self, image: np.ndarray) -> Embedding:
        """RGB uint8 at most `max_side` px, smoothed; the embedding holds only that (and, for gray
        images, the three-scale copy GrabCut models), read-only so threads can share it."""
        rgb = to_rgb8(image)
        H, W = rgb.shape[:2]
        f = min(1.0, self.max_side / max(H, W))
        w, h = max(1, round(W * f)), max(1, round(H * f))
        if (w, h) != (W, H):
            rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)
        noise = _noise_sigma(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
        smooth = cv2.bilateralFilter(rgb, 5, max(10.0, 3.0 * noise), 3.0)
        features = smooth
        if np.array_equal(rgb[:, :, 0], rgb[:, :, 1]) and np.array_equal(rgb[:, :, 1], rgb[:, :, 2]):
            # Gray: one intensity gives GrabCut's colour models too little to tell an object from
            # clutter of the same shade; local means at two scales tell blobs from thin lines.
            gray = smooth[:, :, 0]
            features = np.dstack([gray, cv2.GaussianBlur(gray, (0, 0), 1.5),
                                  cv2.GaussianBlur(gray, (0, 0), 3.0)])
        for a in (smooth, features):
            a.setflags(write=False)
        nbytes = smooth.nbytes + (features.nbytes if features is not smooth else 0)
        return Embedding(self.model_id, (H, W), _Work(smooth, features, (w / W, h / H)), int(nbytes))

    # --- serialisation (shared embedding cache) --------------------------------------------------

    def embedding_arrays(self, embedding: Embedding) -> dict[str, np.ndarray]:
        """The smoothed image, and the gray three-scale features when they differ from it; the
        scale follows from the working and original sizes."""
        data: _Work = embedding.data
        arrays = {"image": data.image}
        if data.features is not data.image:
            arrays["features"] = data.features
        return arrays

    def embedding_from_arrays(self, image_size: tuple[int, int], arrays: dict[str, np.ndarray]) -> Embedding:
        from .base import EmbeddingFormatError

        H, W = image_size
        image = arrays["image"]
        features = arrays.get("features", image)
        if set(arrays) - {"image", "features"}:
            raise EmbeddingFormatError(f"unexpected arrays {sorted(arrays)}")
        for a in (image, features):
            if a.dtype != np.uint8 or a.ndim != 3 or a.shape != image.shape or a.shape[2] != 3:
                raise EmbeddingFormatError(f"grabcut arrays must be HxWx3 uint8, got {a.shape} {a.dtype}")
        h, w = image.shape[:2]
        f = min(1.0, self.max_side / max(H, W))
        if (w, h) != (max(1, round(W * f)), max(1, round(H * f))):
            raise EmbeddingFormatError(f"working size {w}x{h} does not fit image size {W}x{H}")
        for a in (image, features):
            a.setflags(write=False)
        nbytes = image.nbytes + (features.nbytes if features is not image else 0)
        return Embedding(self.model_id, (H, W), _Work(image, features, (w / W, h / H)), int(nbytes))

    # --- per click -------------------------------------------------------------------------------

    def segment(self, embedding: Embedding, prompt: Prompt) -> Region:
        if embedding.model_id != self.model_id:
            raise ValueError(f"embedding is from {embedding.model_id!r}, not {self.model_id!r}")
        if prompt.box is None and not any(prompt.positive):
            raise ValueError("prompt has no positive point or box")
        data: _Work = embedding.data
        (sx, sy), (h, w) = data.scale, data.image.shape[:2]
        # Prompt in working pixels: point (x, y) lies in pixel (floor(x), floor(y)).
        pts = np.clip(np.floor(prompt.point_array() * (sx, sy)), 0, (w - 1, h - 1)).astype(int)
        flags = prompt.label_array().astype(bool)
        pos = [(int(x), int(y)) for x, y in pts[flags]]
        neg = [(int(x), int(y)) for x, y in pts[~flags]]

        if prompt.box is not None:
            x0, y0, x1, y1 = prompt.box
            bx0 = min(max(math.floor(x0 * sx), 0), w - 1)
            by0 = min(max(math.floor(y0 * sy), 0), h - 1)
            bx1 = max(bx0 + 1, min(w, math.ceil(x1 * sx)))
            box = (bx0, by0, bx1, max(by0 + 1, min(h, math.ceil(y1 * sy))))
            for px, py in pos:  # a positive click outside the box says the object reaches there
                box = (min(box[0], px), min(box[1], py), max(box[2], px + 1), max(box[3], py + 1))
            roi = _widen(box, max(10, round(0.2 * max(box[2] - box[0], box[3] - box[1]))), (w, h))
            fg, _ = self._cut(data, roi, box, None, pos, neg)
            pressing = False
        else:
            prior = np.zeros((h, w), bool)
            for p in pos:
                self._grow(data.image, p, prior)
            for _attempt in range(3):
                grown = _bbox(prior)
                reach = max(3, round(_REACH * max(grown[2] - grown[0], grown[3] - grown[1])))
                roi = _widen(grown, 2 * reach + 4, (w, h))
                fg, pushing = self._cut(data, roi, None, prior, pos, neg)
                pressing = pushing > 0.1 * (grown[2] - grown[0] + grown[3] - grown[1])
                if not pressing:
                    break
                # The object is larger than the grown region: grow it to what GrabCut found.
                rw, rh = roi[2] - roi[0], roi[3] - roi[1]
                prior[roi[1]:roi[3], roi[0]:roi[2]] |= cv2.resize(
                    fg.astype(np.uint8), (rw, rh), interpolation=cv2.INTER_NEAREST) > 0

        score = _score(data.image, roi, fg)
        if pressing:
            score *= 0.6
        if _on_border(fg, roi, (w, h)) > 0.25:  # runs along a quarter of the image border
            score *= 0.5
        mask = _to_original(fg, roi, (sx, sy), embedding.image_size)
        return mask_region(mask, score, prompt.label)

    def _grow(self, img: np.ndarray, p: tuple[int, int], prior: np.ndarray) -> None:
        """OR into `prior` the colour-similar region around a positive click (or else a disk).

        Looks in a window around the click first, and in one four times larger when the region may
        not have fitted (it ran into the window's side while still large, or nothing was found).
        """
        h, w = img.shape[:2]
        r = max(32, self.max_side // 8)
        while True:
            x0, y0, x1, y1 = max(0, p[0] - r), max(0, p[1] - r), min(w, p[0] + r + 1), min(h, p[1] + r + 1)
            region, hit_side = _stable_region(_lab(img[y0:y1, x0:x1]), (p[0] - x0, p[1] - y0),
                                              (x0 > 0, y0 > 0, x1 < w, y1 < h), with_side=True)
            whole = x0 == 0 and y0 == 0 and x1 == w and y1 == h
            if whole or not hit_side:
                break
            if region is not None:
                if max(cv2.boundingRect(region.view(np.uint8))[2:]) <= r:  # small: a real leak stopped it
                    break
            r *= 4
        if region is None:
            cv2.circle(prior.view(np.uint8), p, 8, 1, -1)
        else:
            prior[y0:y1, x0:x1] |= region

    def _cut(self, data: _Work, roi, box, prior, pos, neg):
        """GrabCut inside `roi` (shrunk to `roi_side`), seeded by a `box` or by a grown `prior`.

        Returns the bool mask of the ROI at GrabCut's resolution, and how many working pixels of
        it press against the certain background (a sign the box or prior was too small).
        """
        rx0, ry0, rx1, ry1 = roi
        rw, rh = rx1 - rx0, ry1 - ry0
        f = min(1.0, self.roi_side / max(rw, rh))
        gw, gh = max(1, round(rw * f)), max(1, round(rh * f))
        fx, fy = gw / rw, gh / rh

        def cropped(a):
            a = a[ry0:ry1, rx0:rx1]
            return np.ascontiguousarray(cv2.resize(a, (gw, gh), interpolation=cv2.INTER_AREA) if f < 1 else a)

        def to_gc(x, y):  # working pixel (index) -> GrabCut pixel (index), clipped to the ROI
            u, v = int((x - rx0 + 0.5) * fx), int((y - ry0 + 0.5) * fy)
            return min(max(u, 0), gw - 1), min(max(v, 0), gh - 1)

        init = np.full((gh, gw), cv2.GC_BGD, np.uint8)
        if box is not None:
            bx0, by0 = round((box[0] - rx0) * fx), round((box[1] - ry0) * fy)
            bx1, by1 = max(bx0 + 1, round((box[2] - rx0) * fx)), max(by0 + 1, round((box[3] - ry0) * fy))
            ring = max(1, round(0.03 * max(bx1 - bx0, by1 - by0)))
            init[max(0, by0 - ring):by1 + ring, max(0, bx0 - ring):bx1 + ring] = cv2.GC_PR_BGD
            init[by0:by1, bx0:bx1] = cv2.GC_PR_FGD
        else:
            sub = prior[ry0:ry1, rx0:rx1].astype(np.uint8)
            sub = cv2.resize(sub, (gw, gh), interpolation=cv2.INTER_NEAREST) if f < 1 else sub
            k = 2 * max(2, round(_REACH * max(cv2.boundingRect(sub)[2:]))) + 1
            init[cv2.dilate(sub, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))) > 0] = cv2.GC_PR_BGD
            init[sub > 0] = cv2.GC_PR_FGD
        outside = init == cv2.GC_BGD
        seed_r = max(2, round(0.012 * max(gw, gh)))
        pos_gc = [to_gc(*p) for p in pos]
        neg = [(x, y) for x, y in neg if rx0 <= x < rx1 and ry0 <= y < ry1]  # others change nothing here
        if neg:
            guard = np.zeros((gh, gw), np.uint8)
            for p in pos_gc:
                cv2.circle(guard, p, seed_r, 1, -1)
            guard = guard.astype(bool)
            inside = init == cv2.GC_PR_FGD
            fill = inside.sum()

            def accept(m):  # a negative region may not take a positive click or most of the box
                return not (m & guard).any() and (m & inside).sum() <= 0.4 * fill

            lab = _lab(cropped(data.image))
            for p in (to_gc(*q) for q in neg):
                region = _stable_region(lab, p, accept=accept)
                if region is not None:
                    init[region] = cv2.GC_BGD
                cv2.circle(init, p, seed_r, int(cv2.GC_BGD), -1)
        if not np.isin(init, (cv2.GC_BGD, cv2.GC_PR_BGD)).any():  # GrabCut needs both models
            init[[0, -1], :] = cv2.GC_PR_BGD
            init[:, [0, -1]] = cv2.GC_PR_BGD
        for p in pos_gc:
            cv2.circle(init, p, seed_r, int(cv2.GC_FGD), -1)
        fg = self._grabcut(cropped(data.features), init)
        if fg is None:
            # GrabCut's colour models could not tell this object from its surroundings (a gray
            # object among others of its shade): fall back to the colour-similar region around the
            # click or the box centre that best follows edges without leaving the box.
            if prior is not None:
                fg = init == cv2.GC_PR_FGD
            else:
                seed = pos_gc[0] if pos_gc else ((bx0 + bx1) // 2, (by0 + by1) // 2)
                fg = _stable_region(_lab(cropped(data.image)), seed, accept=lambda m: not (m & outside).any())
                fg = init == cv2.GC_PR_FGD if fg is None else fg
            for p in pos_gc:
                cv2.circle(fg.view(np.uint8), p, seed_r, 1, -1)
        fg = _clean(fg, pos_gc)
        if box is None:
            fg = _cut_at_neck(fg, pos_gc)
        # Pixels on the rim of the box's ring, where certain background starts (not the image edge).
        rim = cv2.dilate(outside.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & ~outside
        pushing = int((fg & rim).sum() / max(fx, fy))
        return fg, pushing

    def _grabcut(self, crop: np.ndarray, init: np.ndarray) -> np.ndarray | None:
        """cv2.grabCut one iteration at a time, keeping the last result before any collapse.

        None when the very first iteration collapses (keeps little beyond the certain seeds).
        """
        def fgmask(m):
            return (m == cv2.GC_FGD) | (m == cv2.GC_PR_FGD)

        prev = fgmask(init)
        certain = int((init == cv2.GC_FGD).sum())
        if not prev.any():
            return prev
        cv2.setRNGSeed(0)  # thread-local: k-means initialisation of the GMMs is then repeatable
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        mask, mode = init.copy(), cv2.GC_INIT_WITH_MASK
        for _ in range(self.iterations):
            trial = mask.copy()
            try:
                cv2.grabCut(crop, trial, None, bgd, fgd, 1, mode)
            except cv2.error:  # too few pixels for a colour model (tiny ROI)
                return None if mode == cv2.GC_INIT_WITH_MASK else prev
            cur = fgmask(trial)
            # Collapse (the colour models ran away). The first iteration may legitimately drop
            # most of a box; later ones only refine, so a large loss there keeps the previous.
            if mode == cv2.GC_INIT_WITH_MASK:
                if cur.sum() <= max(1.5 * certain, 0.05 * prev.sum()):
                    return None
            elif cur.sum() < 0.3 * prev.sum():
                break
            mode = cv2.GC_EVAL
            changed = int((cur != prev).sum())
            mask, prev = trial, cur
            if changed <= 0.002 * cur.size:
                break
        return prev


_REACH = 0.15  # how far GrabCut may reach beyond a grown region, as a share of its size


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    x, y, bw, bh = cv2.boundingRect(mask.view(np.uint8))
    return x, y, x + bw, y + bh


def _widen(box, margin: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    w, h = size
    return max(0, box[0] - margin), max(0, box[1] - margin), min(w, box[2] + margin), min(h, box[3] + margin)


def _on_border(fg: np.ndarray, roi, size: tuple[int, int]) -> float:
    """Share of the image border (perimeter) the mask runs along."""
    w, h = size
    gh, gw = fg.shape
    along = 0.0
    if roi[0] == 0:
        along += fg[:, 0].sum() * (roi[3] - roi[1]) / gh
    if roi[1] == 0:
        along += fg[0].sum() * (roi[2] - roi[0]) / gw
    if roi[2] == w:
        along += fg[:, -1].sum() * (roi[3] - roi[1]) / gh
    if roi[3] == h:
        along += fg[-1].sum() * (roi[2] - roi[0]) / gw
    return float(along) / (2 * (w + h))


def _clean(fg: np.ndarray, pos_gc) -> np.ndarray:
    """Keep the parts holding a positive click (else the largest) and fill small holes."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg.astype(np.uint8), connectivity=8)
    if n <= 1:
        return fg
    keep = {int(labels[y, x]) for x, y in pos_gc} - {0}
    if not keep:
        keep = {1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))}
    fg = np.isin(labels, list(keep))
    n, labels, stats, _ = cv2.connectedComponentsWithStats((~fg).astype(np.uint8), connectivity=4)
    limit = max(16, 0.02 * fg.sum())
    border = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])).tolist())
    small = [i for i in range(1, n) if i not in border and stats[i, cv2.CC_STAT_AREA] <= limit]
    return fg | np.isin(labels, small) if small else fg


def _cut_at_neck(fg: np.ndarray, pos_gc) -> np.ndarray:
    """Split off a look-alike touching the clicked object across a neck (e.g. two touching cells).

    Eroding by half the mask's largest inscribed radius leaves one core per round body. If the
    cores under the clicks hold less than 85 % of the core area, each mask pixel goes to its
    nearest core and only those of the clicked cores are kept.
    """
    u8 = fg.astype(np.uint8)
    r = round(0.5 * float(cv2.distanceTransform(np.pad(u8, 1), cv2.DIST_L2, 5).max()))
    if r < 2:
        return fg
    cores = cv2.erode(u8, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
    n, labels = cv2.connectedComponents(cores, connectivity=8)
    if n <= 2:
        return fg
    # A click may lie outside every core (near the outline): it belongs to its nearest one.
    _, nearest = cv2.distanceTransformWithLabels((cores == 0).astype(np.uint8), cv2.DIST_L2, 5,
                                                 labelType=cv2.DIST_LABEL_CCOMP)
    mine = {int(nearest[y, x]) for x, y in pos_gc}
    if np.isin(nearest[cores > 0], list(mine)).mean() >= 0.85:
        return fg
    return _clean(fg & np.isin(nearest, list(mine)), pos_gc)


def _score(img, roi, fg) -> float:
    """0..1 from the result itself: does its outline run along the strongest edges around it?

    Each outline pixel's edge strength is ranked among those of a band around the outline (left
    out: the 3 pixels either side of it). A mean rank at the 70th percentile (an outline through
    texture or noise) scores 0, one at the top scores 1.
    """
    if not fg.any():
        return 0.0
    rx0, ry0, rx1, ry1 = roi
    crop = img[ry0:ry1, rx0:rx1]
    if crop.shape[:2] != fg.shape:
        crop = cv2.resize(crop, (fg.shape[1], fg.shape[0]), interpolation=cv2.INTER_AREA)
    grad = _gradient(cv2.GaussianBlur(_lab(crop), (0, 0), 1.0))
    u8 = fg.astype(np.uint8)
    outline = (u8 - cv2.erode(u8, np.ones((3, 3), np.uint8))).astype(bool)
    outline[[0, -1], :] = False  # the side of the ROI is no edge of the object
    outline[:, [0, -1]] = False
    near = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))
    band = max(6, round(0.08 * max(fg.shape)))
    wide = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * band + 1, 2 * band + 1))
    around = (cv2.dilate(u8, wide) > cv2.erode(u8, wide)) & ~(cv2.dilate(u8, near) > cv2.erode(u8, near))
    if not outline.any() or not around.any():
        return 0.0
    ref = np.sort(grad[around])
    rank = float(np.searchsorted(ref, grad[outline]).mean()) / len(ref)
    return max(0.0, (rank - 0.7) / 0.3)


def _to_original(fg, roi, scale, size) -> np.ndarray:
    """Upsample a GrabCut-resolution ROI mask into a full-size bool mask (bilinear, then 0.5)."""
    H, W = size
    sx, sy = scale
    rx0, ry0, rx1, ry1 = roi
    gh, gw = fg.shape
    fx, fy = gw / (rx1 - rx0), gh / (ry1 - ry0)  # GrabCut pixels per working pixel
    ox0, oy0 = max(0, math.floor(rx0 / sx)), max(0, math.floor(ry0 / sy))
    ox1, oy1 = min(W, math.ceil(rx1 / sx)), min(H, math.ceil(ry1 / sy))
    out = np.zeros((H, W), bool)
    if ox1 <= ox0 or oy1 <= oy0:
        return out
    M = np.array([[sx * fx, 0, ((ox0 + 0.5) * sx - rx0) * fx - 0.5],
                  [0, sy * fy, ((oy0 + 0.5) * sy - ry0) * fy - 0.5]], np.float32)
    up = cv2.warpAffine(fg.astype(np.float32), M, (ox1 - ox0, oy1 - oy0),
                        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)
    out[oy0:oy1, ox0:ox1] = up > 0.5
    return out
