"""Tool-agnostic training: (image, regions) samples -> an ultralytics data set -> new weights.

- `write_dataset` writes samples in the ultralytics layout (images/{train,val}, labels/{train,val},
  data.yaml; a folder per class for classify) with a deterministic split BY IMAGE: an image goes to
  val when a hash of (seed, image id) falls below `val_fraction`, so adding images never moves the
  old ones between splits (and a candidate model is validated on the same images as the current one).
- `train_detector` trains or fine-tunes with ultralytics, reporting every epoch to a callback.
- `validate_detector` scores weights on a data set's val split (mAP50, mAP50-95 of boxes).

Nothing here downloads: ultralytics is imported offline (detect.yolo.import_ultralytics), its font
check is disabled during training/validation and plots are off.
"""
from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .detect.yolo import import_ultralytics, rotated_box_corners
from .types import Region

log = logging.getLogger(__name__)

TASKS = ("detect", "segment", "pose", "obb", "classify")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


# --- data set -----------------------------------------------------------------------------------

def image_id_of(image: np.ndarray | str | Path) -> str:
    """A stable id for an image: its path as given, or a hash of an array's content."""
    if isinstance(image, (str, Path)):
        return str(image)
    arr = np.ascontiguousarray(image)
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{arr.shape}{arr.dtype}".encode())
    h.update(arr.tobytes())
    return "array-" + h.hexdigest()


def split_of(image_id: str, val_fraction: float, seed: int = 0) -> str:
    """'val' or 'train' for an image id: depends only on (seed, id), never on the other images."""
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    return "val" if u < val_fraction else "train"


def _hash_u(image_id: str, seed: int) -> float:
    return int.from_bytes(hashlib.sha256(f"{seed}:{image_id}".encode()).digest()[:8], "big") / 2.0**64


def _stem(image_id: str) -> str:
    base = Path(image_id).stem if not image_id.startswith("array-") else "img"
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in base)[:40] or "img"
    return f"{safe}-{hashlib.sha256(image_id.encode()).hexdigest()[:10]}"


def _region_bounds(r: Region) -> tuple[float, float, float, float] | None:
    if r.kind == "box":
        g = list(r.geometry) + [0.0]
        if len(r.geometry) > 4 and float(r.geometry[4]) % 360.0 != 0.0:
            c = rotated_box_corners(g[:5])
            return float(c[:, 0].min()), float(c[:, 1].min()), float(c[:, 0].max()), float(c[:, 1].max())
        return tuple(float(v) for v in g[:4])
    if "box" in r.extra:
        return tuple(map(float, r.extra["box"]))
    if r.kind == "polygon":
        p = np.asarray(r.geometry, np.float64).reshape(-1, 2)
        return float(p[:, 0].min()), float(p[:, 1].min()), float(p[:, 0].max()), float(p[:, 1].max())
    if r.kind == "mask":
        ys, xs = np.nonzero(np.asarray(r.geometry))
        return (float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1) if len(xs) else None
    if r.kind == "keypoints":
        k = np.asarray(r.geometry, np.float64).reshape(-1, 3)
        k = k[k[:, 2] > 0]
        return (float(k[:, 0].min()), float(k[:, 1].min()), float(k[:, 0].max()), float(k[:, 1].max())) if len(k) else None
    return None


def _polygon_of(r: Region) -> np.ndarray | None:
    if r.kind == "polygon":
        return np.asarray(r.geometry, np.float64).reshape(-1, 2)
    if r.kind == "mask":
        import cv2

        contours, _ = cv2.findContours(np.asarray(r.geometry).astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_SIMPLE)
        if not contours:
            return None
        return max(contours, key=cv2.contourArea).reshape(-1, 2).astype(np.float64) + 0.5
    if r.kind == "box":
        g = (list(r.geometry) + [0.0])[:5]
        return rotated_box_corners(g)
    return None


def _fmt(values) -> str:
    return " ".join(f"{float(v):.6f}" for v in values)


def label_lines(regions: Sequence[Region], class_names: Sequence[str], width: int, height: int,
                task: str = "detect", n_keypoints: int | None = None) -> list[str]:
    """YOLO label lines (normalised to the image size, clipped to [0, 1]) for one image's regions.
    Regions whose label is not in class_names, or that the task cannot use, are skipped."""
    index = {n: i for i, n in enumerate(class_names)}
    scale = np.array([width, height], np.float64)
    lines = []
    for r in regions:
        if r.label not in index:
            continue
        cls = index[r.label]
        if task == "detect":
            b = _region_bounds(r)
            if b is None:
                continue
            x0, y0, x1, y1 = np.clip(np.array(b) / np.tile(scale, 2), 0, 1)
            if x1 <= x0 or y1 <= y0:
                continue
            lines.append(f"{cls} {_fmt([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0])}")
        elif task in ("segment", "obb"):
            if task == "obb" and r.kind != "box":
                continue
            p = _polygon_of(r)
            if p is None or len(p) < 3:
                continue
            lines.append(f"{cls} {_fmt(np.clip(p / scale, 0, 1).ravel())}")
        elif task == "pose":
            if r.kind != "keypoints":
                continue
            k = np.asarray(r.geometry, np.float64).reshape(-1, 3)
            if n_keypoints is not None and len(k) != n_keypoints:
                continue
            b = _region_bounds(r)
            if b is None:
                continue
            x0, y0, x1, y1 = np.clip(np.array(b) / np.tile(scale, 2), 0, 1)
            vis = k[:, 2] > 0
            xy = np.where(vis[:, None], np.clip(k[:, :2] / scale, 0, 1), 0.0)
            v = np.where(vis, 2.0, 0.0)
            kp = np.concatenate([xy, v[:, None]], 1).ravel()
            lines.append(f"{cls} {_fmt([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0])} {_fmt(kp)}")
        else:
            raise ValueError(f"no label lines for task {task!r}")
    return lines


def _write_image(path: Path, image: np.ndarray) -> None:
    import cv2

    img = image[:, :, ::-1] if image.ndim == 3 and image.shape[2] == 3 else image
    if not cv2.imwrite(str(path), np.ascontiguousarray(img)):
        raise OSError(f"cannot write {path}")


def _image_size(image: np.ndarray | str | Path) -> tuple[int, int]:
    if isinstance(image, np.ndarray):
        return int(image.shape[1]), int(image.shape[0])
    from PIL import Image

    with Image.open(image) as im:
        return im.size


def write_dataset(samples: Sequence[tuple], class_names: Sequence[str], out_dir: str | Path,
                  task: str = "detect", val_fraction: float = 0.2, seed: int = 0,
                  keypoint_names: Sequence[str] | None = None, flip_idx: Sequence[int] | None = None) -> Path:
    """Write (image, regions) or (image, regions, image_id) samples as an ultralytics data set.

    image: an RGB/gray uint8 array (written as PNG) or a path (copied as is). The id (default: the
    path, or a hash of the array) decides the split; see `split_of`. If the hash puts no image in
    val (or none in train) and there are at least two, the one nearest the threshold moves, so tiny
    sets still have both splits. Returns data.yaml (the root folder for classify). The folder's
    images/, labels/, train/, val/ and data.yaml are replaced; split.json records each image's split.
    """
    import json

    import yaml

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {TASKS}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError("val_fraction must be in [0, 1)")
    if not class_names:
        raise ValueError("class_names is empty")
    root = Path(out_dir).resolve()
    for sub in ("images", "labels", "train", "val"):
        shutil.rmtree(root / sub, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)

    items = []
    for s in samples:
        image, regions = s[0], list(s[1])
        iid = str(s[2]) if len(s) > 2 and s[2] is not None else image_id_of(image)
        items.append((image, regions, iid))
    ids = [iid for _, _, iid in items]
    if len(set(ids)) != len(ids):
        raise ValueError("two samples have the same image id")
    splits = {iid: split_of(iid, val_fraction, seed) for iid in ids}
    if val_fraction > 0 and len(ids) >= 2:
        if "val" not in splits.values():
            splits[min(ids, key=lambda i: _hash_u(i, seed))] = "val"
        if "train" not in splits.values():
            splits[max(ids, key=lambda i: _hash_u(i, seed))] = "train"

    n_kpt = None
    if task == "pose":
        lens = {np.asarray(r.geometry).reshape(-1, 3).shape[0] for _, regs, _ in items for r in regs
                if r.kind == "keypoints"}
        n_kpt = len(keypoint_names) if keypoint_names else (max(lens) if lens else 0)
        if not n_kpt:
            raise ValueError("pose data set without keypoints")

    counts = {"train": 0, "val": 0, "objects": 0, "skipped_regions": 0}
    for image, regions, iid in items:
        split = splits[iid]
        stem = _stem(iid)
        suffix = Path(image).suffix.lower() if isinstance(image, (str, Path)) else ".png"
        suffix = suffix if suffix in _IMAGE_SUFFIXES else ".png"
        if task == "classify":
            labels = [r.label for r in regions if r.kind == "class" and r.label in class_names]
            if not labels:
                continue
            folder = root / split / labels[0]
        else:
            folder = root / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        dst = folder / f"{stem}{suffix}"
        if isinstance(image, (str, Path)):
            shutil.copyfile(image, dst)
        else:
            _write_image(dst, np.asarray(image))
        counts[split] += 1
        if task == "classify":
            continue
        w, h = _image_size(image)
        lines = label_lines(regions, class_names, w, h, task, n_kpt)
        counts["objects"] += len(lines)
        counts["skipped_regions"] += sum(r.kind != "class" for r in regions) - len(lines)
        lab_dir = root / "labels" / split
        lab_dir.mkdir(parents=True, exist_ok=True)
        (lab_dir / f"{stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    (root / "split.json").write_text(json.dumps({"seed": seed, "val_fraction": val_fraction,
                                                 "splits": splits, "counts": counts}, indent=1))
    if task == "classify":
        for split in ("train", "val"):
            for name in class_names:
                (root / split / name).mkdir(parents=True, exist_ok=True)
        return root
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"path": str(root), "train": "images/train", "val": "images/val",
                            "names": {i: str(n) for i, n in enumerate(class_names)}}
    if task == "pose":
        data["kpt_shape"] = [int(n_kpt), 3]
        if flip_idx is not None:
            data["flip_idx"] = [int(i) for i in flip_idx]
        if keypoint_names:
            data["kpt_names"] = {i: [str(k) for k in keypoint_names] for i in range(len(class_names))}
    path = root / "data.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --- training -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainResult:
    weights: Path
    metrics: dict[str, float]
    seconds: float
    epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list, compare=False)


_patch_lock = threading.RLock()


@contextmanager
def _offline_ultralytics() -> Iterator[Any]:
    """ultralytics, imported offline, with its font download (check_font) disabled meanwhile."""
    ultralytics = import_ultralytics()
    import ultralytics.data.utils as data_utils

    with _patch_lock:
        saved = data_utils.check_font
        data_utils.check_font = lambda *a, **k: None
        try:
            yield ultralytics
        finally:
            data_utils.check_font = saved


def _box_metrics(d: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, name in (("metrics/mAP50(B)", "map50"), ("metrics/mAP50-95(B)", "map50_95"),
                      ("metrics/precision(B)", "precision"), ("metrics/recall(B)", "recall")):
        if key in d:
            out[name] = float(d[key])
    return out


def train_detector(data_yaml: str | Path, base: str | Path, out_dir: str | Path, epochs: int = 50,
                   imgsz: int = 640, device: str = "cpu", progress: Callable[[dict], None] | None = None,
                   batch: int = 8, seed: int = 0, **overrides: Any) -> TrainResult:
    """Train from an architecture (.yaml, random init) or fine-tune a checkpoint (.pt) on `data_yaml`.

    After every epoch (and its validation) `progress` gets {"epoch": i (1-based), "epochs": n,
    "metrics": {"map50", "map50_95", "precision", "recall", and the mean train losses}}; an exception
    raised by it stops training. Returns the best weights (by ultralytics' fitness; the last when
    there is no best) and their val metrics. `overrides` go to ultralytics' train (e.g. patience).
    """
    base = str(base)
    if base.endswith(".pt") and not Path(base).is_file():
        raise FileNotFoundError(f"base weights not found: {base}")  # YOLO() would try to download it
    out_dir = Path(out_dir).resolve()
    history: list[dict[str, Any]] = []

    def on_epoch_end(trainer) -> None:
        epoch = int(trainer.epoch) + 1
        if epoch > int(trainer.epochs) or any(e["epoch"] == epoch for e in history):
            return  # ultralytics fires this once more after the final validation of the best weights
        metrics = _box_metrics(trainer.metrics or {})
        try:
            losses = trainer.label_loss_items(trainer.tloss, prefix="train")
            metrics.update({k.replace("train/", "train_"): float(v) for k, v in losses.items()})
        except Exception:  # loss names are a detail; the epoch report must not fail on them
            pass
        event = {"epoch": epoch, "epochs": int(trainer.epochs), "metrics": metrics}
        history.append(event)
        if progress is not None:
            progress(event)

    t0 = time.perf_counter()
    with _offline_ultralytics():
        from ultralytics import YOLO

        model = YOLO(base)
        model.add_callback("on_fit_epoch_end", on_epoch_end)
        args = dict(data=str(data_yaml), epochs=int(epochs), imgsz=int(imgsz), batch=batch, nbs=batch,
                    workers=0, device=device, amp=False, plots=False, val=True, project=str(out_dir),
                    name="train", exist_ok=True, verbose=False, seed=seed, deterministic=True)
        args.update(overrides)
        model.train(**args)
        trainer = model.trainer
        final = _box_metrics(getattr(trainer, "metrics", None) or {})
    best, last = Path(trainer.best), Path(trainer.last)
    weights = best if best.is_file() else last
    if not weights.is_file():
        raise RuntimeError(f"training wrote no weights under {out_dir}")
    if "map50" not in final:
        final = validate_detector(weights, data_yaml, imgsz=imgsz, device=device)
    return TrainResult(weights, final, time.perf_counter() - t0, len(history), history)


def validate_detector(weights: str | Path, data_yaml: str | Path, imgsz: int | None = None,
                      device: str = "cpu", batch: int = 8, split: str = "val") -> dict[str, float]:
    """Box mAP50 and mAP50-95 of `weights` on the data set's `split`. Pass the same data_yaml (and
    imgsz) for a candidate and the current model to compare them on the same images."""
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"weights not found: {weights}")
    with _offline_ultralytics():
        from ultralytics import YOLO

        model = YOLO(str(weights))
        with tempfile.TemporaryDirectory(prefix="labelassist-val-") as tmp:
            kw: dict[str, Any] = dict(data=str(data_yaml), split=split, batch=batch, device=device, workers=0,
                                      plots=False, verbose=False, save_json=False, project=tmp, name="val")
            if imgsz is not None:
                kw["imgsz"] = int(imgsz)
            res = model.val(**kw)
    box = getattr(res, "box", None)
    if box is not None:
        return {"map50": float(box.map50), "map50_95": float(box.map)}
    return _box_metrics(getattr(res, "results_dict", {}) or {})
