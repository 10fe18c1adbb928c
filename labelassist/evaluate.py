"""`labelassist evaluate`: how good are the pre-labels, and does the uncertainty point at the bad ones?

Ground truth: a list per image of objects, each a dict with "label" (or "class"/"name": class name),
"box" (x0, y0, x1, y1) in pixels, and optionally "mask" (bool H x W), "keypoints" ((K, 2) x, y) and
"ambiguous" (True for objects without clear edges). `load_yolo_dataset` reads an ultralytics data set
(data.yaml + images/<split> + labels/<split>) into this form.

Quality bars (a pre-label "passes" when it matches a ground-truth object of its class one-to-one and):
  - IoU >= 0.8 for objects with clear edges, >= 0.65 for small objects (max(w, h) < 100 px of the
    ground-truth box) or ones marked ambiguous; mask IoU when both sides have masks, else box IoU;
  - keypoints: every point within 8 px (when both sides have keypoints).
A pre-label that does not pass is WRONG (poor geometry, wrong class, duplicate or false positive). A
ground-truth object no kept pre-label matches at IoU >= 0.5 with its class is MISSED. A task needs
work when it has any wrong pre-label or any missed object.

Reports (report.json, report.html with inline SVG plots): per-class precision/recall (IoU 0.5), AP50 and
mAP50-95 (faster-coco-eval, or pycocotools), the pass rate at the quality bars, and for the uncertainty
(region level) and the difficulty (task level): AUROC, share of wrong items caught when reviewing the
most uncertain 20 %, expected calibration error (10 bins), beside 1-confidence and random.
"""
from __future__ import annotations

import argparse
import html
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .backends.types import Prediction, Region
from .backends.uncertainty import UncertaintyEstimator, box_iou, combine_difficulty, region_box

MATCH_IOU = 0.5
SMALL_PX = 100
BAR_CLEAR, BAR_SMALL = 0.8, 0.65
KEYPOINT_PX = 8.0
BUDGET = 0.2


# --- ground truth -------------------------------------------------------------------------------

def _gt_label(obj: dict) -> str:
    for k in ("label", "class", "name"):
        if k in obj:
            return str(obj[k])
    raise KeyError("ground-truth object needs a 'label'")


def quality_bar(obj: dict) -> float:
    x0, y0, x1, y1 = map(float, obj["box"])
    small = max(x1 - x0, y1 - y0) < SMALL_PX
    return BAR_SMALL if small or obj.get("ambiguous") else BAR_CLEAR


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return 0.0
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _pair_iou(region: Region, obj: dict) -> float:
    m = region.extra.get("mask")
    if m is not None and obj.get("mask") is not None:
        return _mask_iou(np.asarray(m, bool), np.asarray(obj["mask"], bool))
    b = region_box(region)
    return 0.0 if b is None else float(box_iou([b], [obj["box"]])[0, 0])


def _keypoints_ok(region: Region, obj: dict) -> bool:
    if region.kind != "keypoints" or obj.get("keypoints") is None:
        return True
    p = np.asarray(region.geometry, np.float64)[:, :2]
    g = np.asarray(obj["keypoints"], np.float64).reshape(-1, 2)
    if p.shape != g.shape:
        return False
    return bool(np.all(np.hypot(*(p - g).T) <= KEYPOINT_PX))


def match(regions: Sequence[Region], gt: Sequence[dict], used: np.ndarray | None = None):
    """Greedy one-to-one matching, regions by descending score, at IoU >= 0.5 with equal class.
    Returns (matched gt index or -1 per region, IoU per region, used flags per gt)."""
    used = np.zeros(len(gt), bool) if used is None else used.copy()
    idx = [-1] * len(regions)
    ious = [0.0] * len(regions)
    order = sorted(range(len(regions)), key=lambda i: -float(regions[i].score))
    for i in order:
        best, best_iou = -1, MATCH_IOU
        for j, obj in enumerate(gt):
            if used[j] or _gt_label(obj) != regions[i].label:
                continue
            v = _pair_iou(regions[i], obj)
            if v >= best_iou:
                best, best_iou = j, v
        if best >= 0:
            used[best] = True
            idx[i], ious[i] = best, best_iou
    return idx, ious, used


def label_regions(regions: Sequence[Region], gt: Sequence[dict]) -> dict[str, Any]:
    """Which pre-labels pass the quality bars, and which ground-truth objects are missed."""
    idx, ious, used = match(regions, gt)
    passes = [j >= 0 and ious[i] >= quality_bar(gt[j]) and _keypoints_ok(regions[i], gt[j])
              for i, j in enumerate(idx)]
    return {"passes": passes, "matched": idx, "iou": ious, "missed": [j for j in range(len(gt)) if not used[j]]}


def label_candidates(candidates: Sequence[Region], kept: Sequence[Region], gt: Sequence[dict]) -> list[bool]:
    """For each near-threshold candidate: does it find a ground-truth object the kept regions missed?"""
    _, _, used = match(kept, gt)
    idx, _, _ = match(candidates, gt, used)
    return [j >= 0 for j in idx]


def load_yolo_dataset(path: str | Path, split: str = "val") -> tuple[list[np.ndarray], list[list[dict]]]:
    """Images (RGB or gray) and ground truth of an ultralytics detect data set (data.yaml or its folder)."""
    import cv2
    import yaml

    path = Path(path)
    yml = path / "data.yaml" if path.is_dir() else path
    data = yaml.safe_load(yml.read_text())
    root = Path(data.get("path") or yml.parent)
    names = data["names"]
    names = {int(k): str(v) for k, v in (names.items() if isinstance(names, dict) else enumerate(names))}
    img_dir = root / data[split]
    images, gts = [], []
    for f in sorted(p for p in img_dir.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif")):
        im = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
        if im is None:
            continue
        if im.ndim == 3:
            im = cv2.cvtColor(im, cv2.COLOR_BGRA2RGB if im.shape[2] == 4 else cv2.COLOR_BGR2RGB)
        h, w = im.shape[:2]
        lab = Path(str(f.parent).replace(f"{Path('images')}", "labels", 1)) / (f.stem + ".txt")
        lab = root / "labels" / Path(data[split]).name / (f.stem + ".txt") if not lab.is_file() else lab
        objs = []
        if lab.is_file():
            for line in lab.read_text().splitlines():
                v = line.split()
                if len(v) < 5:
                    continue
                cx, cy, bw, bh = (float(t) for t in v[1:5])
                objs.append({"label": names[int(v[0])], "box": ((cx - bw / 2) * w, (cy - bh / 2) * h,
                                                                (cx + bw / 2) * w, (cy + bh / 2) * h)})
        images.append(im)
        gts.append(objs)
    return images, gts


# --- metrics ------------------------------------------------------------------------------------

def auroc(scores, labels) -> float | None:
    """AUROC of `scores` for flagging positives (labels True); None when only one class is present."""
    y = np.asarray(labels, bool)
    if y.all() or not y.any():
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, np.asarray(scores, np.float64)))


def review_count(n: int, budget: float = BUDGET) -> int:
    return int(math.ceil(budget * n - 1e-9))


def caught_at_budget(scores, labels, budget: float = BUDGET) -> float | None:
    """Share of positives among the top `budget` share of items by score (ties in the given order)."""
    y = np.asarray(labels, bool)
    if not y.any():
        return None
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    return float(y[order[:review_count(len(y), budget)]].sum() / y.sum())


def caught_curve(scores, labels, steps: int = 20) -> list[tuple[float, float]]:
    y = np.asarray(labels, bool)
    if not y.any():
        return []
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    cum = np.concatenate([[0], np.cumsum(y[order])]) / y.sum()
    return [(b, float(cum[review_count(len(y), b)])) for b in np.linspace(0, 1, steps + 1)]


def reliability(probs, labels, bins: int = 10) -> list[dict[str, float]]:
    p = np.clip(np.asarray(probs, np.float64), 0, 1)
    y = np.asarray(labels, np.float64)
    which = np.minimum((p * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        m = which == b
        if m.any():
            out.append({"lo": b / bins, "hi": (b + 1) / bins, "n": int(m.sum()),
                        "mean_prob": float(p[m].mean()), "frequency": float(y[m].mean())})
    return out


def ece(probs, labels, bins: int = 10) -> float | None:
    """Expected calibration error: sum over equal-width bins of |mean prob - frequency| * share."""
    n = len(np.asarray(labels))
    if n == 0:
        return None
    return float(sum(abs(b["mean_prob"] - b["frequency"]) * b["n"] / n for b in reliability(probs, labels, bins)))


def _flag_metrics(ours, conf_baseline, labels) -> dict[str, Any]:
    n = len(labels)
    return {"n": n, "positives": int(np.sum(labels)),
            "auroc": {"ours": auroc(ours, labels), "one_minus_conf": auroc(conf_baseline, labels), "random": 0.5},
            f"caught_at_{int(BUDGET * 100)}pct": {
                "ours": caught_at_budget(ours, labels), "one_minus_conf": caught_at_budget(conf_baseline, labels),
                "random": (review_count(n) / n) if n else None},
            "ece": {"ours": ece(ours, labels), "one_minus_conf": ece(conf_baseline, labels)},
            "reliability": reliability(ours, labels),
            "curve": {"ours": caught_curve(ours, labels), "one_minus_conf": caught_curve(conf_baseline, labels)}}


def coco_ap(predictions: Sequence[Sequence[Region]], gts: Sequence[Sequence[dict]], classes: list[str]) -> dict:
    """AP50 and mAP50-95 (boxes) with faster-coco-eval (or pycocotools)."""
    cat = {c: i + 1 for i, c in enumerate(classes)}
    images, anns, dets = [], [], []
    for i, (regs, gt) in enumerate(zip(predictions, gts)):
        images.append({"id": i + 1, "width": 1, "height": 1})
        for o in gt:
            x0, y0, x1, y1 = map(float, o["box"])
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat[_gt_label(o)],
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
        for r in regs:
            b = region_box(r)
            if b is not None and r.label in cat:
                dets.append({"image_id": i + 1, "category_id": cat[r.label], "score": float(r.score),
                             "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]})
    if not anns or not dets:
        return {"AP50": 0.0, "mAP50_95": 0.0}
    gt_dict = {"images": images, "annotations": anns, "categories": [{"id": v, "name": k} for k, v in cat.items()]}
    try:
        from faster_coco_eval import COCO, COCOeval_faster as COCOeval

        kw = {"print_function": lambda *a, **k: None}
    except ImportError:  # pragma: no cover
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        kw = {}
    coco_gt = COCO(gt_dict)
    coco_dt = coco_gt.loadRes(dets)
    ev = COCOeval(coco_gt, coco_dt, iouType="bbox", **kw)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return {"AP50": float(max(ev.stats[1], 0.0)), "mAP50_95": float(max(ev.stats[0], 0.0))}


# --- evaluation ---------------------------------------------------------------------------------

def _predict(model, images) -> list[Prediction]:
    if isinstance(model, UncertaintyEstimator):
        return model.predict(images)
    out = model.predict(images)
    version = getattr(model, "model_id", type(model).__name__)
    return [p if isinstance(p, Prediction) else
            Prediction(tuple(p), version, combine_difficulty([r.uncertainty for r in p])) for p in out]


def evaluate(model, images: Sequence[np.ndarray], ground_truth: Sequence[Sequence[dict]],
             out_dir: str | Path | None = None, title: str = "labelassist evaluation") -> dict[str, Any]:
    """Run `model` (an UncertaintyEstimator or a detector) on `images` and report; writes
    out_dir/report.json and out_dir/report.html when out_dir is given."""
    preds = _predict(model, list(images))
    classes = sorted({_gt_label(o) for gt in ground_truth for o in gt} |
                     {r.label for p in preds for r in p.regions if r.label is not None})
    per_class = {c: {"tp": 0, "pred": 0, "gt": 0} for c in classes}
    u, conf, wrong, t_diff, t_conf, t_work = [], [], [], [], [], []
    missed_total = 0
    for p, gt in zip(preds, ground_truth):
        regs = list(p.regions)
        lab = label_regions(regs, gt)
        for r, j in zip(regs, lab["matched"]):
            per_class[r.label]["pred"] += 1
            per_class[r.label]["tp"] += int(j >= 0)
        for o in gt:
            per_class[_gt_label(o)]["gt"] += 1
        w = [not ok for ok in lab["passes"]]
        u += [r.uncertainty for r in regs]
        conf += [1.0 - r.score for r in regs]
        wrong += w
        missed_total += len(lab["missed"])
        t_work.append(any(w) or bool(lab["missed"]))
        t_diff.append(p.difficulty)
        t_conf.append(combine_difficulty([1.0 - r.score for r in regs]))
    for c, d in per_class.items():
        d["precision"] = d["tp"] / d["pred"] if d["pred"] else None
        d["recall"] = d["tp"] / d["gt"] if d["gt"] else None
    n_regions = len(wrong)
    report = {
        "title": title,
        "model_version": preds[0].model_version if preds else None,
        "images": len(preds), "regions": n_regions,
        "ground_truth_objects": int(sum(len(g) for g in ground_truth)),
        "missed_objects": missed_total,
        "per_class": per_class,
        "coco": coco_ap([p.regions for p in preds], ground_truth, classes),
        "quality": {"pass_rate": (1.0 - float(np.mean(wrong))) if n_regions else None,
                    "bars": {"iou_clear": BAR_CLEAR, "iou_small_or_ambiguous": BAR_SMALL, "small_px": SMALL_PX,
                             "keypoint_px": KEYPOINT_PX}},
        "regions_flagging": _flag_metrics(u, conf, wrong),
        "tasks_flagging": _flag_metrics(t_diff, t_conf, t_work),
    }
    report["tasks_flagging"]["needs_work_share"] = float(np.mean(t_work)) if t_work else None
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=2))
        (out / "report.html").write_text(render_html(report))
    return report


# --- HTML ---------------------------------------------------------------------------------------

def _svg_plot(series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str,
              points: dict[str, list[tuple[float, float]]] | None = None) -> str:
    W, H, M = 320, 260, 40
    colours = ["#d62728", "#1f77b4", "#7f7f7f", "#2ca02c"]

    def xy(x, y):
        return M + x * (W - M - 10), H - M - y * (H - M - 10)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-size="11">',
             f'<rect x="{M}" y="10" width="{W - M - 10}" height="{H - M - 10}" fill="none" stroke="#999"/>']
    for t in (0, 0.5, 1):
        x, _ = xy(t, 0)
        _, y = xy(0, t)
        parts.append(f'<text x="{x - 6:.0f}" y="{H - M + 14}">{t:g}</text>')
        parts.append(f'<text x="{M - 24}" y="{y + 4:.0f}">{t:g}</text>')
    parts.append(f'<text x="{W / 2 - 40:.0f}" y="{H - 6}">{html.escape(xlabel)}</text>')
    parts.append(f'<text x="4" y="{H / 2:.0f}" transform="rotate(-90 10 {H / 2:.0f})">{html.escape(ylabel)}</text>')
    for k, (name, pts) in enumerate(series.items()):
        if not pts:
            continue
        c = colours[k % len(colours)]
        path = " ".join(f"{a:.1f},{b:.1f}" for a, b in (xy(*p) for p in pts))
        dash = ' stroke-dasharray="4 3"' if name in ("random", "perfect calibration") else ""
        parts.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="2"{dash}/>')
        parts.append(f'<text x="{M + 6}" y="{24 + 13 * k}" fill="{c}">{html.escape(name)}</text>')
    for name, pts in (points or {}).items():
        for a, b in (xy(*p) for p in pts):
            parts.append(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="#d62728"/>')
    parts.append("</svg>")
    return "".join(parts)


def _fmt(v) -> str:
    return "–" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def render_html(report: dict[str, Any]) -> str:
    rows = []
    for level in ("regions_flagging", "tasks_flagging"):
        m = report[level]
        cau = m[f"caught_at_{int(BUDGET * 100)}pct"]
        for key, label in (("ours", "ours"), ("one_minus_conf", "1 - confidence"), ("random", "random")):
            rows.append(f"<tr><td>{level.split('_')[0]}</td><td>{label}</td><td>{_fmt(m['auroc'].get(key))}</td>"
                        f"<td>{_fmt(cau.get(key))}</td><td>{_fmt(m['ece'].get(key))}</td></tr>")
    cls_rows = "".join(f"<tr><td>{html.escape(c)}</td><td>{_fmt(d['precision'])}</td><td>{_fmt(d['recall'])}</td>"
                       f"<td>{d['tp']}</td><td>{d['pred']}</td><td>{d['gt']}</td></tr>"
                       for c, d in report["per_class"].items())
    plots = []
    for level in ("regions_flagging", "tasks_flagging"):
        m = report[level]
        rel = [(b["mean_prob"], b["frequency"]) for b in m["reliability"]]
        plots.append(_svg_plot({"perfect calibration": [(0, 0), (1, 1)], "ours": rel}, "predicted probability",
                               "observed frequency", {"ours": rel}))
        plots.append(_svg_plot({"ours": m["curve"]["ours"], "1 - confidence": m["curve"]["one_minus_conf"],
                                "random": [(0, 0), (1, 1)]}, "review budget (share)", "errors caught"))
    q = report["quality"]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(report['title'])}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px}}</style>
</head><body><h1>{html.escape(report['title'])}</h1>
<p>model {html.escape(str(report['model_version']))}; {report['images']} images, {report['regions']} pre-labels,
{report['ground_truth_objects']} ground-truth objects, {report['missed_objects']} missed.
AP50 {_fmt(report['coco']['AP50'])}, mAP50-95 {_fmt(report['coco']['mAP50_95'])};
pre-labels meeting the quality bars: {_fmt(q['pass_rate'])}.</p>
<h2>Per class (IoU 0.5)</h2><table><tr><th>class</th><th>precision</th><th>recall</th><th>TP</th><th>pred</th><th>GT</th></tr>{cls_rows}</table>
<h2>Flagging wrong pre-labels / tasks that need work</h2>
<table><tr><th>level</th><th>score</th><th>AUROC</th><th>caught at {int(BUDGET * 100)} % review</th><th>ECE</th></tr>{''.join(rows)}</table>
<h2>Regions: reliability and errors caught vs review budget</h2>{plots[0]}{plots[1]}
<h2>Tasks: reliability and tasks caught vs review budget</h2>{plots[2]}{plots[3]}
</body></html>"""


# --- CLI ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="labelassist evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="ultralytics .pt weights")
    parser.add_argument("--data", required=True, help="YOLO data set: data.yaml or its folder")
    parser.add_argument("--split", default="val")
    parser.add_argument("--calibration", help="JSON from UncertaintyEstimator.to_dict()")
    parser.add_argument("--fit-on", help="split of --data to calibrate on before evaluating (not the evaluated one)")
    parser.add_argument("--conf", type=float, default=0.25)
    parser.add_argument("--imgsz", type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="evaluation")
    parser.add_argument("--save-calibration", action="store_true",
                        help="with --fit-on: also save the calibration beside the weights, where the server loads it")
    args = parser.parse_args(argv)

    from .backends.detect import YoloDetector

    det = YoloDetector.from_weights(args.weights, device=args.device, conf=args.conf, imgsz=args.imgsz)
    est = UncertaintyEstimator(det)
    if args.calibration:
        est = UncertaintyEstimator.from_dict(det, json.loads(Path(args.calibration).read_text()))
    if args.fit_on:
        if args.fit_on == args.split:
            parser.error("--fit-on must be another split than --split")
        est.fit(*load_yolo_dataset(args.data, args.fit_on))
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "calibration.json").write_text(json.dumps(est.to_dict(), indent=2))
        if args.save_calibration:
            from .backends.uncertainty import calibration_path

            calibration_path(args.weights).write_text(json.dumps(est.to_dict(), indent=2))
    images, gt = load_yolo_dataset(args.data, args.split)
    rep = evaluate(est, images, gt, args.out)
    r, t = rep["regions_flagging"], rep["tasks_flagging"]
    print(f"AP50 {_fmt(rep['coco']['AP50'])}  mAP50-95 {_fmt(rep['coco']['mAP50_95'])}  "
          f"pass rate {_fmt(rep['quality']['pass_rate'])}")
    print(f"regions AUROC {_fmt(r['auroc']['ours'])} (1-conf {_fmt(r['auroc']['one_minus_conf'])}), "
          f"tasks AUROC {_fmt(t['auroc']['ours'])}; report in {args.out}/report.html")
    return 0
