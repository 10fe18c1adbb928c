"""Uncertainty estimation and evaluation on controlled inputs: fake detectors with fixed regions, no
training, known answers."""
from __future__ import annotations

import json

import numpy as np
import pytest

from labelassist.backends.types import Prediction, Region
from labelassist.backends.uncertainty import (Calibrator, UncertaintyEstimator, combine_difficulty, raw_risk,
                                              region_features, summarise, task_score)
from labelassist.evaluate import (auroc, caught_at_budget, ece, evaluate, label_regions, load_yolo_dataset,
                                  quality_bar)


def box(label, x0, y0, x1, y1, score=0.9, margin=None):
    extra = {} if margin is None else {"margin": margin}
    return Region(label, "box", (float(x0), float(y0), float(x1), float(y1), 0.0), score, 1 - score, extra)


# --- a fake detector that knows which view it is shown -------------------------------------------

def marked_image(index: int, h: int = 200, w: int = 300) -> np.ndarray:
    """Gray image whose left 8 columns hold 10 * (index + 1) and right 8 columns 250: a flipped view
    shows 250 on the left, a rescaled one has another shape."""
    im = np.full((h, w), 100, np.uint8)
    im[:, :8] = 10 * (index + 1)
    im[:, -8:] = 250
    return im


class FakeDetector:
    """Regions per image and per view ("orig", "hflip", "scale"), given in ORIGINAL image pixels; the
    fake moves them into the view's pixels as a real detector would find them there."""

    model_id = "fake-1"

    def __init__(self, per_image: dict[int, dict[str, list[Region]]], conf: float = 0.25, shape=(200, 300)):
        self.per_image = per_image
        self.conf = conf
        self.shape = shape
        self.calls = 0

    def predict(self, images, conf=None):
        self.calls += 1
        conf = self.conf if conf is None else conf
        out = []
        for im in images:
            h, w = im.shape[:2]
            flipped = int(im[h // 2, 0]) == 250
            index = int(im[h // 2, -1 if flipped else 0]) // 10 - 1
            view = "hflip" if flipped else ("orig" if (h, w) == self.shape else "scale")
            found = []
            for r in self.per_image.get(index, {}).get(view, []):
                if r.score < conf:
                    continue
                x0, y0, x1, y1 = r.geometry[:4]
                if view == "hflip":
                    x0, x1 = self.shape[1] - x1, self.shape[1] - x0
                elif view == "scale":
                    sx, sy = w / self.shape[1], h / self.shape[0]
                    x0, x1, y0, y1 = x0 * sx, x1 * sx, y0 * sy, y1 * sy
                found.append(Region(r.label, "box", (x0, y0, x1, y1, 0.0), r.score, 1 - r.score, dict(r.extra)))
            out.append(found)
        return out


def same_in_all_views(*regions):
    return {"orig": list(regions), "hflip": list(regions), "scale": list(regions)}


# --- calibrator ---------------------------------------------------------------------------------

def test_calibrator_is_monotone_and_reproduces_known_frequencies():
    raw, wrong = [], []
    for r, freq in ((0.1, 0.1), (0.4, 0.3), (0.7, 0.6), (0.9, 0.9)):
        raw += [r] * 100
        wrong += [1] * int(freq * 100) + [0] * (100 - int(freq * 100))
    cal = Calibrator().fit(raw, wrong)
    assert not cal.is_identity
    for r, freq in ((0.1, 0.1), (0.4, 0.3), (0.7, 0.6), (0.9, 0.9)):
        assert cal(r) == pytest.approx(freq, abs=1e-3)
    grid = cal(np.linspace(-0.5, 1.5, 401))
    assert np.all(np.diff(grid) >= 0)
    assert grid.min() >= 0.001 - 1e-9 and grid.max() <= 0.999 + 1e-9


def test_calibrator_fixes_an_overconfident_score():
    rng = np.random.default_rng(0)
    raw = rng.uniform(0, 1, 4000)
    wrong = rng.uniform(0, 1, 4000) < raw ** 2  # true probability is raw squared
    cal = Calibrator().fit(raw, wrong)
    assert cal(0.5) == pytest.approx(0.25, abs=0.07)
    assert cal(0.9) == pytest.approx(0.81, abs=0.07)


def test_calibrator_falls_back_to_identity():
    few = Calibrator().fit([0.1, 0.9] * 5, [0, 1] * 5)
    assert few.is_identity and few(0.3) == pytest.approx(0.3)
    one_class = Calibrator().fit(np.linspace(0, 1, 100), np.zeros(100))
    assert one_class.is_identity and one_class(0.7) == pytest.approx(0.7)
    assert Calibrator.identity()(1.5) == 1.0


def test_calibrator_round_trips_through_json():
    cal = Calibrator(weights=[-1.0, 2.0, 0, 0, 0, 0, 0, 0]).fit(np.linspace(0, 1, 50), np.arange(50) > 30)
    back = Calibrator.from_dict(json.loads(json.dumps(cal.to_dict())))
    xs = np.linspace(0, 1, 33)
    np.testing.assert_allclose(back(xs), cal(xs))
    np.testing.assert_allclose(back.weights, cal.weights)
    assert back.digest() == cal.digest()
    assert Calibrator.from_dict(Calibrator.identity().to_dict()).is_identity


# --- signals ------------------------------------------------------------------------------------

def test_region_agreeing_across_views_is_less_risky():
    steady, lonely = box("disc", 10, 10, 60, 60), box("disc", 100, 100, 150, 150)
    views = [[steady], [steady]]  # both views found only `steady`, exactly
    f_steady, f_lonely = region_features(steady, views), region_features(lonely, views)
    assert f_steady.agreement == (1.0, 1.0) and f_lonely.agreement == (0.0, 0.0)
    assert raw_risk(f_steady) < raw_risk(f_lonely)
    # a counterpart of another class is no agreement, and counts as a class flip
    f_flip = region_features(steady, [[box("square", 10, 10, 60, 60)]])
    assert f_flip.agreement == (0.0,) and f_flip.class_flip == (True,)
    assert raw_risk(f_flip) > raw_risk(f_steady)


def test_estimator_tta_agreement_end_to_end():
    steady, lonely = box("disc", 20, 20, 80, 80), box("square", 150, 40, 210, 100)
    det = FakeDetector({0: {"orig": [steady, lonely], "hflip": [steady], "scale": [steady]}})
    pred = UncertaintyEstimator(det).predict([marked_image(0)])[0]
    assert det.calls == 3  # once per view, whole batch
    by_label = {r.label: r for r in pred.regions}
    assert by_label["disc"].uncertainty < by_label["square"].uncertainty
    assert by_label["disc"].extra["signals"][2] == pytest.approx(0.0, abs=1e-6)  # full agreement
    assert by_label["disc"].score == pytest.approx(0.9)


def test_lower_margin_means_more_risk():
    f_sure = region_features(box("disc", 0, 0, 50, 50, 0.8, margin=0.75), [])
    f_torn = region_features(box("disc", 0, 0, 50, 50, 0.8, margin=0.05), [])
    assert raw_risk(f_torn) > raw_risk(f_sure)


# --- difficulty ---------------------------------------------------------------------------------

def test_difficulty_grows_with_an_unexplained_candidate_and_with_uncertain_regions():
    r = box("disc", 20, 20, 80, 80, 0.9)
    weak_elsewhere = box("square", 200, 120, 240, 160, 0.15)
    weak_on_r = box("square", 22, 22, 80, 80, 0.15)  # explained by the kept region
    doubtful = box("triangle", 150, 20, 190, 60, 0.3)
    det = FakeDetector({
        0: same_in_all_views(r),
        1: same_in_all_views(r, weak_elsewhere),
        2: same_in_all_views(r, weak_on_r),
        3: same_in_all_views(r, doubtful),
        4: {},
    })
    est = UncertaintyEstimator(det)
    images = [marked_image(i) for i in range(5)]
    preds = est.predict(images)
    d = [p.difficulty for p in preds]
    assert d[1] > d[0] + 0.1  # a possible miss
    # the weak box on the kept region is no possible miss (only a hint of class confusion for it)
    assert [len(a.candidates) for a in est.analyse(images)] == [0, 1, 0, 0, 0]
    assert d[0] <= d[2] < d[1]
    assert d[3] > d[0]  # another, doubtful region
    assert len(preds[1].regions) == 1  # candidates never become pre-labels
    assert d[4] < 0.05 and preds[4].regions == ()
    assert [task_score(p) for p in preds] == pytest.approx([1 - x for x in d])
    assert summarise(preds)["review_order"][0] in (1, 3)


def test_combine_difficulty():
    assert combine_difficulty([]) == 0.0
    assert combine_difficulty([0.5, 0.5]) == pytest.approx(0.75)
    assert combine_difficulty([0.1], [0.5]) == pytest.approx(1 - 0.9 * 0.5)


def test_model_version_follows_the_calibration():
    det = FakeDetector({})
    a = UncertaintyEstimator(det)
    b = UncertaintyEstimator(det, Calibrator().fit(np.linspace(0, 1, 40), np.arange(40) > 25))
    assert a.score_version.startswith("u1-") and a.score_version == UncertaintyEstimator(det).score_version
    assert a.score_version != b.score_version
    assert a.model_version.startswith("fake-1+u1-")
    c = UncertaintyEstimator.from_dict(det, json.loads(json.dumps(b.to_dict())))
    assert c.score_version == b.score_version


def test_fit_calibrates_on_labelled_images():
    rng = np.random.default_rng(1)
    per_image, gts = {}, []
    for i in range(24):
        good = box("disc", 10, 10, 90, 90, float(rng.uniform(0.7, 0.95)))
        ghost = box("square", 150, 100, 190, 140, float(rng.uniform(0.26, 0.5)))  # false positive
        per_image[i] = {"orig": [good, ghost], "hflip": [good], "scale": [good]}
        gts.append([{"label": "disc", "box": (10, 10, 90, 90)}])
    est = UncertaintyEstimator(FakeDetector(per_image))
    counts = est.fit([marked_image(i) for i in range(24)], gts)
    assert counts["regions"] == 48 and counts["wrong"] == 24
    pred = est.predict([marked_image(0)])[0]
    u = {r.label: r.uncertainty for r in pred.regions}
    assert u["square"] > 0.9 and u["disc"] < 0.1


# --- metrics ------------------------------------------------------------------------------------

def test_metrics_on_known_arrays():
    labels = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1], bool)
    perfect = np.arange(10) / 10.0
    assert auroc(perfect, labels) == 1.0
    assert auroc(-perfect, labels) == 0.0
    assert auroc(perfect, np.zeros(10)) is None
    assert caught_at_budget(perfect, labels) == 1.0  # 2 wrong of 10, top 20 % = 2 reviewed
    assert caught_at_budget(-perfect, labels) == 0.0
    assert caught_at_budget(perfect, np.arange(10) >= 6) == pytest.approx(0.5)  # 4 wrong, 2 reviewed
    assert ece(np.full(10, 0.2), labels) == pytest.approx(0.0)
    assert ece(np.ones(4), np.zeros(4)) == pytest.approx(1.0)
    assert ece([0.05, 0.05, 0.95, 0.95], [0, 0, 1, 1]) == pytest.approx(0.05)


def test_quality_bars():
    assert quality_bar({"box": (0, 0, 200, 150)}) == 0.8
    assert quality_bar({"box": (0, 0, 99, 60)}) == 0.65
    assert quality_bar({"box": (0, 0, 200, 150), "ambiguous": True}) == 0.65
    kp = Region("p", "keypoints", np.array([[10.0, 10, 1], [50, 50, 1]]), 0.9, 0.1, {"box": (0, 0, 60, 60)})
    gt = {"label": "p", "box": (0, 0, 60, 60)}
    assert label_regions([kp], [{**gt, "keypoints": [[12, 13], [50, 45]]}])["passes"] == [True]
    assert label_regions([kp], [{**gt, "keypoints": [[12, 13], [50, 40]]}])["passes"] == [False]


def test_evaluate_writes_reports_with_expected_numbers(tmp_path):
    big = (0, 0, 200, 200)
    images = [np.zeros((300, 300), np.uint8) for _ in range(3)]
    gt = [[{"label": "disc", "box": big}],
          [{"label": "disc", "box": big}],
          [{"label": "square", "box": (0, 0, 50, 50)}, {"label": "disc", "box": (220, 220, 280, 280)}]]

    class Fixed:
        model_id = "fixed"
        conf = 0.25
        out = [[box("disc", 0, 0, 200, 170, 0.9)],  # IoU 0.85 on a large object: passes 0.8
               [box("disc", 0, 0, 200, 140, 0.8)],  # IoU 0.70 on a large object: fails 0.8
               [box("square", 0, 0, 50, 35, 0.7)]]  # IoU 0.70 on a small object: passes 0.65 (disc missed)

        def predict(self, images, conf=None):
            return self.out[:len(images)]

    rep = evaluate(Fixed(), images, gt, tmp_path)
    assert (tmp_path / "report.json").is_file()
    html = (tmp_path / "report.html").read_text()
    assert "<svg" in html and "polyline" in html
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["quality"]["pass_rate"] == pytest.approx(2 / 3)
    for key in ("per_class", "coco", "quality", "regions_flagging", "tasks_flagging", "missed_objects"):
        assert key in on_disk
    assert rep["missed_objects"] == 1
    assert rep["per_class"]["disc"]["precision"] == 1.0 and rep["per_class"]["disc"]["recall"] == pytest.approx(2 / 3)
    assert rep["per_class"]["square"]["recall"] == 1.0
    assert 0.0 < rep["coco"]["AP50"] <= 1.0
    r = rep["regions_flagging"]
    assert r["n"] == 3 and r["positives"] == 1
    assert r["auroc"]["random"] == 0.5 and r["caught_at_20pct"]["random"] == pytest.approx(1 / 3)
    # the wrong one has the middle confidence: 1 - conf ranks it second of three
    assert r["auroc"]["one_minus_conf"] == pytest.approx(0.5)
    t = rep["tasks_flagging"]
    assert t["positives"] == 2 and t["n"] == 3  # image 2 (poor box) and image 3 (a missed disc)


def test_evaluate_with_estimator_and_yolo_dataset(tmp_path):
    from synthetic_detection import CLASSES, make_detection_scene, write_yolo_dataset

    data = write_yolo_dataset(tmp_path / "ds", n_train=1, n_val=2, size=96, seed=3)
    images, gt = load_yolo_dataset(data, "val")
    assert len(images) == 2 and images[0].shape == (96, 96, 3)
    scene = make_detection_scene(3 * 10_000_000 + 1_000_000, 96)
    assert [o["label"] for o in gt[0]] == [CLASSES[o.cls] for o in scene.objects]
    np.testing.assert_allclose([o["box"] for o in gt[0]], scene.boxes(), atol=0.01)

    class Oracle:  # finds every object exactly
        model_id, conf = "oracle", 0.25

        def predict(self, ims, conf=None):
            return [[box(o["label"], *o["box"], 0.95) for o in g] for g in gt[:len(ims)]]

    rep = evaluate(Oracle(), images, gt, tmp_path / "rep")
    assert rep["quality"]["pass_rate"] == 1.0 and rep["missed_objects"] == 0
    assert rep["coco"]["AP50"] == pytest.approx(1.0)
