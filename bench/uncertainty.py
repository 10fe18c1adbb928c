"""Bench: does the calibrated uncertainty point at the wrong pre-labels and the tasks that need work?

Trains yolov8n from its architecture file (random init, nothing downloaded) on synthetic scenes on the
CPU, calibrates the UncertaintyEstimator on a calibration split and reports on a held-out test split
(never used for fitting) via labelassist.evaluate:

    python bench/uncertainty.py --epochs 30 --imgsz 192 --seed 0 --out /tmp/ua-bench

Targets: region AUROC >= 0.80 and >= 50 % of wrong pre-labels caught in the 20 % most uncertain, each
better than 1 - confidence.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def train(out: Path, epochs: int, imgsz: int, n_train: int, seed: int) -> tuple[Path, float]:
    """Train yolov8n from its architecture file on synthetic scenes (CPU); return (weights, seconds)."""
    from labelassist.backends.detect.yolo import import_ultralytics

    import_ultralytics()
    import ultralytics.data.utils as data_utils
    from ultralytics import YOLO

    from synthetic_detection import write_yolo_dataset

    data = write_yolo_dataset(out / "data", n_train, 4, imgsz, task="detect", seed=seed)
    data_utils.check_font = lambda *a, **k: None  # would fetch a font for plots
    t0 = time.perf_counter()
    model = YOLO("yolov8n.yaml")
    model.train(data=str(data), epochs=epochs, imgsz=imgsz, batch=8, nbs=8, workers=0, device="cpu",
                amp=False, plots=False, val=False, project=str(out / "runs"), name="train", exist_ok=True,
                verbose=False, seed=seed, deterministic=True)
    return out / "runs" / "train" / "weights" / "last.pt", time.perf_counter() - t0


def scenes(first_seed: int, n: int, size: int):
    from synthetic_detection import CLASSES, make_detection_scene

    images, gts = [], []
    for i in range(n):
        sc = make_detection_scene(first_seed + i, size)
        images.append(sc.image)
        gts.append([{"label": CLASSES[o.cls], "box": o.box} for o in sc.objects])
    return images, gts


def main(argv=None) -> int:
    import argparse
    import json

    from labelassist.backends.detect import YoloDetector
    from labelassist.backends.uncertainty import UncertaintyEstimator
    from labelassist.evaluate import evaluate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--imgsz", type=int, default=192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=120)
    ap.add_argument("--n-cal", type=int, default=150)
    ap.add_argument("--n-test", type=int, default=150)
    ap.add_argument("--weights", help="skip training: use these weights")
    ap.add_argument("--out", default="/tmp/labelassist-uncertainty-bench")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.weights:
        weights, seconds = Path(args.weights), 0.0
    else:
        weights, seconds = train(out, args.epochs, args.imgsz, args.n_train, args.seed)
    print(f"training: {seconds:.1f} s ({args.epochs} epochs, {args.n_train} scenes, imgsz {args.imgsz})")
    det = YoloDetector.from_weights(weights, device="cpu", imgsz=args.imgsz)
    # calibration and test scenes: seeds far from the training ones (write_yolo_dataset uses seed * 1e7 + i)
    base = args.seed * 10_000_000 + 5_000_000
    cal_images, cal_gt = scenes(base, args.n_cal, args.imgsz)
    test_images, test_gt = scenes(base + 1_000_000, args.n_test, args.imgsz)

    t0 = time.perf_counter()
    est = UncertaintyEstimator(det)
    fitted = est.fit(cal_images, cal_gt)
    print(f"calibration split: {fitted['regions']} pre-labels, {fitted['wrong']} wrong, "
          f"{fitted['candidates']} candidates, {fitted['true_misses']} real misses "
          f"({time.perf_counter() - t0:.1f} s)")
    (out / "calibration.json").write_text(json.dumps(est.to_dict(), indent=2))
    t0 = time.perf_counter()
    rep = evaluate(est, test_images, test_gt, out / "report", title="uncertainty bench (held-out split)")
    print(f"held-out split: {rep['images']} images, {rep['regions']} pre-labels, "
          f"{rep['ground_truth_objects']} objects, {rep['missed_objects']} missed ({time.perf_counter() - t0:.1f} s)")
    print(f"AP50 {rep['coco']['AP50']:.3f}  mAP50-95 {rep['coco']['mAP50_95']:.3f}  "
          f"pass rate at quality bars {rep['quality']['pass_rate']:.3f}")
    f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    for level in ("regions_flagging", "tasks_flagging"):
        m = rep[level]
        c = m["caught_at_20pct"]
        print(f"{level.split('_')[0]:8s} (n={m['n']}, positives={m['positives']}): "
              f"AUROC ours {f(m['auroc']['ours'])} | 1-conf {f(m['auroc']['one_minus_conf'])} | random 0.500;  "
              f"caught@20% ours {f(c['ours'])} | 1-conf {f(c['one_minus_conf'])} | random {f(c['random'])};  "
              f"ECE ours {f(m['ece']['ours'])} | 1-conf {f(m['ece']['one_minus_conf'])}")
    r = rep["regions_flagging"]
    ok = (r["auroc"]["ours"] or 0) >= 0.8 and (r["caught_at_20pct"]["ours"] or 0) >= 0.5
    better = ((r["auroc"]["ours"] or 0) > (r["auroc"]["one_minus_conf"] or 0)
              and (r["caught_at_20pct"]["ours"] or 0) > (r["caught_at_20pct"]["one_minus_conf"] or 0))
    print(f"targets (AUROC >= 0.80, caught >= 0.50): {'met' if ok else 'NOT met'}; "
          f"better than 1-confidence on both: {'yes' if better else 'no'}")
    print(f"report: {out / 'report' / 'report.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
