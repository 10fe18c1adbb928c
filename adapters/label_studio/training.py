"""Retraining from Label Studio: the Train button (START_TRAINING) or N new annotations.

The job, outside the request: pull the project's annotations with label-studio-sdk (which refreshes
personal access tokens itself), turn them into an ultralytics dataset split by image, fine-tune from
the current version (or YOLO_WEIGHTS, or an architecture .yaml), compare with the current version on
the same validation split, refit the uncertainty calibration on it, publish the new version, and
promote it only if it is not worse. A failure anywhere leaves the current model serving.
"""
from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

from ...backends.registry import ModelRegistry
from ...jobs import JobFailed
from ...settings import Settings
from .config import parse_label_config
from .dataset import class_names, tasks_to_samples
from .client import label_studio_client, with_retries
from .media import MediaFetcher

log = logging.getLogger(__name__)

#: Control tags a detector can be trained for, and the ultralytics task each needs.
TRAINABLE = {"RectangleLabels": "detect", "PolygonLabels": "segment", "BrushLabels": "segment"}
BASE_YAML = {"detect": "yolov8n.yaml", "segment": "yolov8n-seg.yaml"}


class Trainer:
    """Turns webhook events into training jobs on a runner (in-process thread or RQ queue)."""

    def __init__(self, settings: Settings, runner):
        self.settings = settings
        self.runner = runner
        self._counts: dict[int, int] = {}
        self._counts_lock = threading.Lock()

    def start(self, project_id: int):
        """Queue a training job for the project; a job already queued or running is returned.

        An RQ worker reads its own settings (its machine's paths); in-process jobs use ours."""
        kwargs: dict[str, Any] = {"project_id": project_id}
        if not getattr(self.runner, "remote", False):
            kwargs["settings"] = self.settings
        return self.runner.submit("train", f"train:{project_id}", train_project, kwargs)

    def annotation_event(self, project_id: int):
        """Count an annotation event; start training when TRAIN_AFTER_ANNOTATIONS is reached."""
        every = self.settings.train_after_annotations
        if every <= 0:
            return None
        with self._counts_lock:
            self._counts[project_id] = self._counts.get(project_id, 0) + 1
            if self._counts[project_id] < every:
                return None
            self._counts[project_id] = 0
        return self.start(project_id)


def train_project(progress: Callable[[dict], None], project_id: int, settings: Settings | None = None) -> dict:
    """The training job (module-level: RQ workers import it by name)."""
    from ...settings import get_settings

    return TrainingJob(settings or get_settings()).run(project_id, progress)


class TrainingJob:
    """One training run: export, dataset, fine-tune, validate, calibrate, publish, maybe promote.

    It never touches a serving process: promotion moves the registry's pointer, and every server
    (this process or another machine's) follows the pointer on its next request."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.registry = ModelRegistry(settings.registry_dir)

    # --- the job --------------------------------------------------------------------------------
    def export(self, project_id: int) -> tuple[str, list[dict]]:
        """The project's label config and its tasks with annotations."""
        s = self.settings
        client = label_studio_client(s, "training")
        project = with_retries(f"reading project {project_id}", lambda: client.projects.get(id=project_id),
                               s.train_export_attempts, s.train_export_backoff)

        def all_tasks():
            pager = client.tasks.list(project=project_id, fields="all", only_annotated=True, page_size=100)
            return [t.model_dump() if hasattr(t, "model_dump") else dict(t) for t in pager]

        tasks = with_retries(f"exporting project {project_id}", all_tasks, s.train_export_attempts,
                             s.train_export_backoff)
        return project.label_config, tasks

    def run(self, project_id: int, progress: Callable[[dict], None]) -> dict:
        from ...backends.detect import YoloDetector
        from ...backends.train import train_detector, validate_detector, write_dataset
        from ...backends.uncertainty import UncertaintyEstimator
        from ...evaluate import load_yolo_dataset

        s = self.settings
        progress({"stage": "export"})
        label_config, tasks = self.export(project_id)
        config = parse_label_config(label_config)
        control = next((c for c in config.controls.values() if c.tag in TRAINABLE and c.labels), None)
        if control is None:
            raise JobFailed(f"project {project_id} has no control a detector can learn "
                            f"({', '.join(TRAINABLE)})")
        task_kind = TRAINABLE[control.tag]
        samples = [a for a in tasks_to_samples(tasks, config, controls=[control.name]) if a.image]
        if len(samples) < s.train_min_images:
            raise JobFailed(f"project {project_id} has {len(samples)} annotated images; training needs at "
                            f"least {s.train_min_images} (TRAIN_MIN_IMAGES)")
        progress({"stage": "dataset", "images": len(samples)})
        names = class_names(config, controls=[control.name])
        with tempfile.TemporaryDirectory(prefix="labelassist-train-") as tmp:
            fetcher = MediaFetcher(s)
            rows = [(fetcher.load_image(a.image, a.task_id), list(a.regions), f"task-{a.task_id}")
                    for a in samples]
            data_yaml = write_dataset(rows, names, Path(tmp) / "data", task=task_kind)
            current = self.registry.current()
            base = (current.weights if current else
                    (s.models_dir / s.yolo_weights if s.yolo_weights and not s.yolo_weights.is_absolute()
                     else s.yolo_weights) or BASE_YAML[task_kind])
            progress({"stage": "train", "base": current.version_id if current else Path(str(base)).name})
            result = train_detector(data_yaml, base, Path(tmp) / "runs", epochs=s.train_epochs,
                                    imgsz=s.train_imgsz, device=_device(s.device),
                                    progress=lambda p: progress({"stage": "train", **p}))
            progress({"stage": "validate"})
            metrics = validate_detector(result.weights, data_yaml, imgsz=s.train_imgsz, device=_device(s.device))
            baseline = None
            if current is not None:
                try:
                    baseline = validate_detector(current.weights, data_yaml, imgsz=s.train_imgsz,
                                                 device=_device(s.device))
                except Exception as exc:  # classes changed, say: the new one competes alone
                    log.warning("current version %s cannot be validated on the new split: %s", current.version_id, exc)
            progress({"stage": "calibrate"})
            detector = YoloDetector.from_weights(result.weights, device=s.device, conf=s.detect_conf)
            estimator = UncertaintyEstimator(detector)
            estimator.fit(*load_yolo_dataset(data_yaml, "val"))
            progress({"stage": "publish"})
            version = self.registry.publish(
                result.weights, metrics={**metrics, "baseline": baseline, "images": len(samples)},
                calibration=estimator.to_dict(), parent=current.version_id if current else None,
                validate=lambda p: YoloDetector.from_weights(p, device="cpu"),
                info={"project": project_id, "control": control.name, "task": task_kind})
        better = baseline is None or metrics["map50"] >= baseline["map50"]
        answer = {"version": version, "metrics": metrics, "baseline": baseline, "promoted": better}
        if not better:
            answer["reason"] = (f"validation mAP50 {metrics['map50']:.3f} is below the current version's "
                                f"{baseline['map50']:.3f} on the same split: kept, not served")
            return answer
        self.registry.promote(version)
        return answer


def _device(device: str) -> str:
    from ...backends.detect.yolo import resolve_device

    return resolve_device(device)
