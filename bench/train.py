"""Bench: the Train button. How long from a click to the new version serving, and does the model get
better from the team's annotations?

A stand-in Label Studio (real HTTP, label-studio-sdk reads it) holds synthetic annotated images; the
backend runs in-process with its default in-process job runner. Two rounds, as a team would work:

  1. the first few annotations are in: Train -> v1 (from yolov8n.yaml: nothing is downloaded);
  2. many more annotations are in: Train -> v2, fine-tuned from v1.

For each click: seconds until /setup answers the new model_version (what makes Label Studio fetch
fresh predictions). Held-out mAP50 (COCO AP at IoU 0.5, faster-coco-eval, on scenes never used for
training or validation) before training and after each round.

    python bench/train.py --first 12 --total 80 --epochs 20 --imgsz 160
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def held_out_ap50(weights: Path | None, images, gts, imgsz: int) -> float:
    from labelassist.backends.detect import YoloDetector
    from labelassist.evaluate import evaluate

    if weights is None:
        return 0.0  # an untrained detector pre-labels nothing
    detector = YoloDetector.from_weights(weights, device="cpu", imgsz=imgsz, conf=0.01)
    return float(evaluate(detector, images, gts)["coco"]["AP50"])


def click_until_served(url: str, config: str, before: str, timeout: float = 3600) -> tuple[float, dict]:
    import requests

    t0 = time.perf_counter()
    resp = requests.post(f"{url}/webhook", json={"action": "START_TRAINING", "project": {"id": 1}}, timeout=10)
    resp.raise_for_status()
    job_id = resp.json()["job_id"]
    while time.perf_counter() - t0 < timeout:
        job = requests.get(f"{url}/jobs/{job_id}", timeout=10).json()
        if job["state"] == "failed":
            raise SystemExit(f"training failed: {job['error']}")
        served = requests.post(f"{url}/setup", json={"schema": config}, timeout=10).json()["model_version"]
        if served != before:
            return time.perf_counter() - t0, job
        if job["state"] == "finished" and not job["result"].get("promoted"):
            raise SystemExit(f"not promoted: {job['result'].get('reason')}")
        time.sleep(0.25)
    raise SystemExit("timed out")


def main(argv=None) -> int:
    import argparse

    import requests

    from fake_label_studio import CONFIG, SIZE, fake_label_studio
    from servers import serving
    from synthetic_detection import CLASSES, make_detection_scene

    from labelassist.adapters.label_studio.app import create_app
    from labelassist.backends.registry import ModelRegistry
    from labelassist.settings import Settings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--first", type=int, default=12, help="annotated images at the first click")
    ap.add_argument("--total", type=int, default=80, help="annotated images at the second click")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--imgsz", type=int, default=160)
    ap.add_argument("--held-out", type=int, default=100)
    args = ap.parse_args(argv)

    held = [make_detection_scene(900_000 + i, SIZE) for i in range(args.held_out)]
    images = [s.image for s in held]
    gts = [[{"label": CLASSES[o.cls], "box": o.box} for o in s.objects] for s in held]

    with tempfile.TemporaryDirectory(prefix="labelassist-train-bench-") as tmp:
        tmp = Path(tmp)
        ls_app = fake_label_studio(args.total)
        ls_app.config["visible"] = args.first
        with serving(ls_app) as ls:
            settings = Settings(label_studio_url=ls, label_studio_api_key="legacy-token",
                                media_cache_dir=tmp / "media", models_dir=tmp / "models",
                                registry_dir=tmp / "models" / "registry", device="cpu",
                                train_epochs=args.epochs, train_imgsz=args.imgsz, uncertainty_tta="")
            registry = ModelRegistry(settings.registry_dir)
            with serving(create_app(settings)) as url:
                version = requests.post(f"{url}/setup", json={"schema": CONFIG}, timeout=10).json()["model_version"]
                rows = [("untrained", 0, None, held_out_ap50(None, images, gts, args.imgsz))]
                for n in (args.first, args.total):
                    ls_app.config["visible"] = n
                    seconds, job = click_until_served(url, CONFIG, version)
                    version = requests.post(f"{url}/setup", json={"schema": CONFIG}, timeout=10).json()["model_version"]
                    weights = registry.current().weights
                    rows.append((job["result"]["version"], n, seconds,
                                 held_out_ap50(weights, images, gts, args.imgsz)))
                    print(f"Train click with {n} annotated images -> {job['result']['version']} serving after "
                          f"{seconds:.1f} s (validation mAP50 {job['result']['metrics']['map50']:.3f})", flush=True)

    print(f"\nheld-out mAP50 ({args.held_out} unseen scenes, {args.epochs} epochs per job, imgsz {args.imgsz}, CPU):")
    for name, n, seconds, ap50 in rows:
        print(f"  {name:<10} annotated images {n:>3}  mAP50 {ap50:.3f}"
              + ("" if seconds is None else f"  click -> serving {seconds:.1f} s"))
    first, second = rows[1][3], rows[2][3]
    print(f"more annotations: mAP50 {first:.3f} -> {second:.3f} "
          f"({'+' if second >= first else ''}{second - first:.3f}); from untrained: {rows[0][3]:.3f} -> {second:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
