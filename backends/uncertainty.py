"""Calibrated uncertainty for pre-labels: per region `score` and `uncertainty`, per task `difficulty`.

`uncertainty` is the probability that a region is WRONG (below the quality bar, wrong class or a false
positive); `difficulty` is the probability that the task's pre-annotation needs work, counting the risk
of missed objects too. Label Studio's prediction score is `task_score(prediction) = 1 - difficulty`, so
sorting by it ascending puts the worst tasks first.

Signals (all work on stock models, no retraining):

- the detector's confidence and class margin (top-1 minus top-2 class score, extra["margin"]);
- test-time augmentation: the detector runs once per view over the whole batch (horizontal flip,
  rescale); view regions are mapped back to the original image, and a region's agreement in a view is
  the IoU with the best match of the same class (0 when there is none); a view whose best-overlapping
  match has another class counts as class disagreement;
- near-threshold candidates: detections with a confidence between `low_conf` and the detector's serving
  threshold that overlap no kept region (IoU < `CANDIDATE_OVERLAP`); each is a possible missed object.
  A candidate that overlaps a kept region of another class is a sign of class confusion for that region.

`raw_risk(features)` combines the signals logistic-style (fixed default weights, or weights fitted by
`fit_weights` on labelled data); a `Calibrator` (isotonic, increasing) maps the raw number to a
probability. Misses have their own calibrator: by default (identity) the miss probability of a candidate
is its own confidence, which is below the serving threshold, so a lone weak candidate moves the
difficulty only a little.

difficulty = 1 - prod_i(1 - u_i) * prod_j(1 - m_j)   (u_i regions, m_j unexplained candidates)

Geometry used for matching is each region's axis-aligned box: the box itself, extra["bounds"] for rotated
boxes, extra["box"] for polygons and keypoints. Whole-image "class" regions have no box: they get the
confidence/margin signals only.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .types import Prediction, Region

#: Version of the score definition; part of `score_version` (with the calibration's hash).
SCORE_DEFINITION = "u1"
#: A candidate overlapping a kept region at this IoU or more is "explained" by it (not a possible miss).
CANDIDATE_OVERLAP = 0.3
#: A view's region counts as the same object for class agreement at this IoU or more.
CLASS_MATCH_IOU = 0.5

FEATURE_NAMES = ("low_conf", "low_margin", "tta_disagreement", "tta_class_flip", "tta_score_drop",
                 "small", "class_competitor")
# Fixed, sensible default weights (bias first): high for box inconsistency and low confidence.
DEFAULT_WEIGHTS = np.array([-3.0, 2.5, 1.0, 3.0, 1.5, 1.0, 0.3, 1.0])


# --- geometry -----------------------------------------------------------------------------------

def region_box(region: Region) -> tuple[float, float, float, float] | None:
    """The axis-aligned (x0, y0, x1, y1) of a region, or None (whole-image class)."""
    if region.kind == "box":
        g = region.geometry
        if len(g) > 4 and float(g[4]) != 0.0 and "bounds" in region.extra:
            return tuple(map(float, region.extra["bounds"]))
        return tuple(map(float, g[:4]))
    if "box" in region.extra:
        return tuple(map(float, region.extra["box"]))
    if region.kind == "polygon":
        p = np.asarray(region.geometry, np.float64).reshape(-1, 2)
        return float(p[:, 0].min()), float(p[:, 1].min()), float(p[:, 0].max()), float(p[:, 1].max())
    return None


def box_iou(a, b) -> np.ndarray:
    """Pairwise IoU of (N, 4) and (M, 4) boxes -> (N, M)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def _boxes(regions: Sequence[Region]) -> tuple[np.ndarray, list[int]]:
    """(N, 4) boxes of the regions that have one, and their indices."""
    idx, rows = [], []
    for i, r in enumerate(regions):
        b = region_box(r)
        if b is not None:
            idx.append(i)
            rows.append(b)
    return np.asarray(rows, np.float64).reshape(-1, 4), idx


# --- views (test-time augmentation) -------------------------------------------------------------

def parse_view(name: str) -> tuple[str, float]:
    if name == "hflip":
        return "hflip", 1.0
    if name.startswith("scale"):
        s = float(name[5:])
        if not 0.1 <= s <= 4.0:
            raise ValueError(f"scale out of range in view {name!r}")
        return "scale", s
    raise ValueError(f"unknown view {name!r}; use 'hflip' or 'scale<factor>'")


def apply_view(image: np.ndarray, view: str) -> np.ndarray:
    kind, s = parse_view(view)
    if kind == "hflip":
        return np.ascontiguousarray(image[:, ::-1])
    import cv2

    h, w = image.shape[:2]
    size = (max(1, int(round(w * s))), max(1, int(round(h * s))))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)


def unview_regions(regions: Sequence[Region], view: str, shape: tuple[int, int],
                   view_shape: tuple[int, int] | None = None) -> list[Region]:
    """Regions found in a view, as boxes in the original image's pixels (other geometry dropped)."""
    kind, _ = parse_view(view)
    h, w = shape[:2]
    out = []
    for r in regions:
        b = region_box(r)
        if b is None:
            out.append(r)
            continue
        x0, y0, x1, y1 = b
        if kind == "hflip":
            x0, x1 = w - x1, w - x0
        else:
            vh, vw = view_shape[:2]
            sx, sy = w / vw, h / vh
            x0, x1, y0, y1 = x0 * sx, x1 * sx, y0 * sy, y1 * sy
        out.append(Region(r.label, "box", (x0, y0, x1, y1, 0.0), r.score, r.uncertainty, dict(r.extra)))
    return out


# --- features -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class RegionSignals:
    score: float
    margin: float
    #: Per view: IoU with the best same-class match (0 when unmatched).
    agreement: tuple[float, ...] = ()
    #: Per view: True when the best-overlapping match (IoU >= CLASS_MATCH_IOU) has another class.
    class_flip: tuple[bool, ...] = ()
    #: Per view: the score of the best same-class match (0 when unmatched).
    view_score: tuple[float, ...] = ()
    #: max(w, h) of the region's box in pixels (None: no box).
    size: float | None = None
    #: Highest IoU with another-class region or candidate in the original view.
    competitor_iou: float = 0.0

    def vector(self) -> np.ndarray:
        agree = float(np.mean(self.agreement)) if self.agreement else 1.0
        flip = float(np.mean(self.class_flip)) if self.class_flip else 0.0
        vscore = float(np.mean(self.view_score)) if self.view_score else self.score
        small = 0.0 if self.size is None else float(np.clip(1.0 - self.size / 100.0, 0.0, 1.0))
        return np.array([1.0 - self.score, 1.0 - self.margin, 1.0 - agree, flip,
                         float(np.clip(self.score - vscore, 0.0, 1.0)), small, self.competitor_iou])


def region_features(region: Region, tta_regions: Sequence[Sequence[Region]] = (),
                    others: Sequence[Region] = ()) -> RegionSignals:
    """The signals of `region`, given the regions each view found (mapped back to the original image)
    and `others`: the remaining regions/candidates of the original view (for class competition)."""
    score = float(region.score)
    margin = region.extra.get("margin")
    margin = score if margin is None else float(np.clip(margin, 0.0, 1.0))
    box = region_box(region)
    if box is None:
        return RegionSignals(score, margin)
    agreement, flips, vscores = [], [], []
    for view in tta_regions:
        vb, vi = _boxes(view)
        if not vi:
            agreement.append(0.0)
            flips.append(False)
            vscores.append(0.0)
            continue
        ious = box_iou([box], vb)[0]
        same = np.array([view[i].label == region.label for i in vi])
        s_iou = np.where(same, ious, 0.0)
        j = int(np.argmax(s_iou))
        agreement.append(float(s_iou[j]))
        vscores.append(float(view[vi[j]].score) if s_iou[j] > 0 else 0.0)
        k = int(np.argmax(ious))
        flips.append(bool(ious[k] >= CLASS_MATCH_IOU and not same[k] and ious[k] > s_iou[j]))
    comp = 0.0
    ob, oi = _boxes([o for o in others if o.label != region.label])
    if oi:
        comp = float(box_iou([box], ob)[0].max())
    return RegionSignals(score, margin, tuple(agreement), tuple(flips), tuple(vscores),
                         float(max(box[2] - box[0], box[3] - box[1])), comp)


def _as_vector(features) -> np.ndarray:
    return features.vector() if isinstance(features, RegionSignals) else np.asarray(features, np.float64)


def raw_risk(features, weights: np.ndarray | None = None) -> float:
    """Uncalibrated 0..1 risk: logistic of bias + weights . features."""
    w = DEFAULT_WEIGHTS if weights is None else np.asarray(weights, np.float64)
    z = float(w[0] + np.dot(w[1:], _as_vector(features)))
    return float(1.0 / (1.0 + np.exp(-np.clip(z, -40, 40))))


def fit_weights(feature_rows, is_wrong, min_samples: int = 20) -> np.ndarray | None:
    """Logistic-regression weights (bias first) for `raw_risk`, or None (too few samples / one class)."""
    X = np.asarray([_as_vector(f) for f in feature_rows], np.float64).reshape(-1, len(FEATURE_NAMES))
    y = np.asarray(is_wrong, bool)
    if len(y) < min_samples or y.all() or not y.any():
        return None
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=1.0, max_iter=1000).fit(X, y)
    return np.concatenate([lr.intercept_, lr.coef_[0]])


# --- calibration --------------------------------------------------------------------------------

class Calibrator:
    """Monotone map from a raw 0..1 risk to a probability (isotonic regression, increasing).

    `fit` needs at least `min_samples` samples with both outcomes; otherwise it stays the identity.
    Fitted outputs are clipped to [0.001, 0.999] (then mixed with 1e-4 of the raw score to break ties). Serialises to a small JSON-able dict.
    """

    LO, HI = 0.001, 0.999
    #: Weight of the raw score mixed into a fitted map: isotonic maps are flat on steps, and ties
    #: would throw away the raw ranking (and AUROC); this tiny share keeps the order strict while
    #: moving probabilities by less than TIE_BREAK.
    TIE_BREAK = 1e-4

    def __init__(self, x: Sequence[float] | None = None, y: Sequence[float] | None = None,
                 weights: Sequence[float] | None = None):
        self.x = None if x is None else np.asarray(x, np.float64)
        self.y = None if y is None else np.asarray(y, np.float64)
        #: Optional fitted feature weights for `raw_risk` (bias first), kept with the map.
        self.weights = None if weights is None else np.asarray(weights, np.float64)

    @classmethod
    def identity(cls) -> "Calibrator":
        return cls()

    @property
    def is_identity(self) -> bool:
        return self.x is None

    def fit(self, raw_scores, is_wrong, min_samples: int = 20) -> "Calibrator":
        raw = np.asarray(raw_scores, np.float64).ravel()
        y = np.asarray(is_wrong, np.float64).ravel()
        if len(raw) < min_samples or y.min(initial=1) == y.max(initial=0):
            self.x = self.y = None
            return self
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(increasing=True, y_min=self.LO, y_max=self.HI, out_of_bounds="clip")
        iso.fit(raw, y)
        self.x = np.asarray(iso.X_thresholds_, np.float64)
        self.y = np.clip(np.asarray(iso.y_thresholds_, np.float64), self.LO, self.HI)
        return self

    def __call__(self, raw):
        r = np.asarray(raw, np.float64)
        if self.x is None:
            out = np.clip(r, 0.0, 1.0)
        else:
            out = (1 - self.TIE_BREAK) * np.interp(r, self.x, self.y) + self.TIE_BREAK * np.clip(r, 0.0, 1.0)
        return float(out) if out.ndim == 0 else out

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "identity" if self.x is None else "isotonic",
                "x": None if self.x is None else [float(v) for v in self.x],
                "y": None if self.y is None else [float(v) for v in self.y],
                "weights": None if self.weights is None else [float(v) for v in self.weights]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Calibrator":
        if d.get("kind", "identity") == "identity":
            return cls(weights=d.get("weights"))
        return cls(d["x"], d["y"], d.get("weights"))

    def digest(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=4).hexdigest()


# --- the estimator ------------------------------------------------------------------------------

def combine_difficulty(uncertainties: Sequence[float], miss_probs: Sequence[float] = ()) -> float:
    """P(the task needs work) assuming independent errors: 1 - prod(1 - u) * prod(1 - m)."""
    keep = np.prod(1.0 - np.clip(np.asarray(list(uncertainties), np.float64), 0, 1))
    keep *= np.prod(1.0 - np.clip(np.asarray(list(miss_probs), np.float64), 0, 1))
    return float(np.clip(1.0 - keep, 0.0, 1.0))


def task_score(prediction: Prediction) -> float:
    """Label Studio's prediction score: 1 - difficulty (low = needs work; sort ascending)."""
    return 1.0 - float(prediction.difficulty)


def summarise(predictions: Sequence[Prediction]) -> dict[str, Any]:
    """Per-task scores and the order to review in (most difficult first)."""
    scores = [task_score(p) for p in predictions]
    return {"task_scores": scores, "review_order": [int(i) for i in np.argsort(scores, kind="stable")],
            "mean_difficulty": float(np.mean([p.difficulty for p in predictions])) if predictions else 0.0}


@dataclass
class ImageAnalysis:
    """Everything the estimator saw for one image (for fitting and evaluation)."""

    kept: list[Region]
    features: list[RegionSignals]
    candidates: list[Region]  # unexplained near-threshold candidates
    all_low: list[Region] = field(default_factory=list)


class UncertaintyEstimator:
    """Wraps a detector (`predict(images, conf=None) -> list[list[Region]]`, attribute `conf`) and adds
    calibrated `uncertainty` per region and `difficulty` per image."""

    def __init__(self, detector, calibrator: Calibrator | None = None, tta: Sequence[str] = ("hflip", "scale0.8"),
                 low_conf: float = 0.05, miss_calibrator: Calibrator | None = None):
        for v in tta:
            parse_view(v)
        self.detector = detector
        self.calibrator = calibrator or Calibrator.identity()
        self.miss_calibrator = miss_calibrator or Calibrator.identity()
        self.tta = tuple(tta)
        self.low_conf = float(low_conf)

    # --- identity -------------------------------------------------------------------------------

    @property
    def score_version(self) -> str:
        h = hashlib.blake2b(digest_size=4)
        h.update(json.dumps([self.tta, self.low_conf, self.calibrator.to_dict(),
                             self.miss_calibrator.to_dict()], sort_keys=True).encode())
        return f"{SCORE_DEFINITION}-{h.hexdigest()}"

    @property
    def model_version(self) -> str:
        return f"{getattr(self.detector, 'model_id', type(self.detector).__name__)}+{self.score_version}"

    def to_dict(self) -> dict[str, Any]:
        return {"score_definition": SCORE_DEFINITION, "tta": list(self.tta), "low_conf": self.low_conf,
                "calibrator": self.calibrator.to_dict(), "miss_calibrator": self.miss_calibrator.to_dict()}

    @classmethod
    def from_dict(cls, detector, d: dict[str, Any]) -> "UncertaintyEstimator":
        return cls(detector, Calibrator.from_dict(d["calibrator"]), d.get("tta", ("hflip", "scale0.8")),
                   d.get("low_conf", 0.05), Calibrator.from_dict(d["miss_calibrator"]))

    # --- running --------------------------------------------------------------------------------

    def _run(self, images: list[np.ndarray], conf: float) -> list[list[Region]]:
        try:
            return self.detector.predict(images, conf=conf)
        except TypeError:  # a detector without a conf override
            return self.detector.predict(images)

    def analyse(self, images: Sequence[np.ndarray]) -> list[ImageAnalysis]:
        """One detector call per view over the whole list (original view at the low threshold)."""
        images = list(images)
        if not images:
            return []
        serve = float(getattr(self.detector, "conf", 0.25))
        low = min(self.low_conf, serve)
        base = self._run(images, low)
        views = []
        for v in self.tta:
            vimgs = [apply_view(im, v) for im in images]
            found = self._run(vimgs, low)
            views.append([unview_regions(f, v, im.shape, vi.shape) for f, im, vi in zip(found, images, vimgs)])
        out = []
        for i, regions in enumerate(base):
            kept = [r for r in regions if r.score >= serve]
            weak = [r for r in regions if r.score < serve]
            feats = [region_features(r, [view[i] for view in views], [o for o in regions if o is not r])
                     for r in kept]
            kb, _ = _boxes(kept)
            unexplained = []
            for c in weak:
                b = region_box(c)
                if b is None:
                    continue
                if len(kb) and box_iou([b], kb)[0].max() >= CANDIDATE_OVERLAP:
                    continue
                # several weak boxes on one spot count once: keep the strongest
                if unexplained and box_iou([b], _boxes(unexplained)[0])[0].max() >= CANDIDATE_OVERLAP:
                    continue
                unexplained.append(c)
            out.append(ImageAnalysis(kept, feats, unexplained, list(regions)))
        return out

    def region_raw(self, features: RegionSignals) -> float:
        return raw_risk(features, self.calibrator.weights)

    def miss_raw(self, candidate: Region) -> float:
        return float(candidate.score)

    def predict(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        return [self.finish(a) for a in self.analyse(images)]

    def finish(self, a: ImageAnalysis) -> Prediction:
        regions = []
        for r, f in zip(a.kept, a.features):
            raw = self.region_raw(f)
            u = float(self.calibrator(raw))
            extra = {**r.extra, "raw_risk": raw, "signals": f.vector().tolist()}
            regions.append(Region(r.label, r.kind, r.geometry, float(r.score), u, extra))
        misses = [float(self.miss_calibrator(self.miss_raw(c))) for c in a.candidates]
        return Prediction(tuple(regions), self.model_version,
                          combine_difficulty([r.uncertainty for r in regions], misses))

    # --- fitting --------------------------------------------------------------------------------

    def fit(self, images: Sequence[np.ndarray], ground_truth: Sequence[Sequence[dict]],
            fit_weights_too: bool = True) -> dict[str, Any]:
        """Calibrate on labelled data (never the test split): fit feature weights (logistic) and the
        isotonic maps for regions and for candidate misses. Returns counts."""
        from labelassist.evaluate import label_candidates, label_regions  # evaluation owns the quality bars

        analyses = self.analyse(images)
        feats, wrong, craw, cmiss = [], [], [], []
        for a, gt in zip(analyses, ground_truth):
            labels = label_regions(a.kept, gt)
            feats += a.features
            wrong += [not ok for ok in labels["passes"]]
            craw += [self.miss_raw(c) for c in a.candidates]
            cmiss += label_candidates(a.candidates, a.kept, gt)
        weights = fit_weights(feats, wrong) if fit_weights_too else None
        cal = Calibrator(weights=weights)
        cal.fit([raw_risk(f, weights) for f in feats], wrong)
        if cal.is_identity:
            cal.weights = None
        self.calibrator = cal
        self.miss_calibrator = Calibrator().fit(craw, cmiss)
        return {"regions": len(wrong), "wrong": int(np.sum(wrong)), "candidates": len(cmiss),
                "true_misses": int(np.sum(cmiss)), "weights": None if weights is None else weights.tolist()}


def calibration_path(weights) -> Path:
    """Where a detector's calibration lives: beside its weights, `<stem>.calibration.json`."""
    weights = Path(weights)
    return weights.with_name(weights.stem + ".calibration.json")
