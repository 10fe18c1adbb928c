"""Training end to end on the CPU: synthetic scenes -> write_dataset -> train -> validate -> fine-tune."""
from __future__ import annotations

import pytest

from synthetic_detection import CLASSES, make_detection_scene

pytestmark = pytest.mark.slow


def _samples(n: int, size: int = 128):
    from labelassist.backends.types import Region

    out = []
    for i in range(n):
        scene = make_detection_scene(5000 + i, size)
        regions = [Region(o.name, "box", (*map(float, o.box), 0.0)) for o in scene.objects]
        out.append((scene.image, regions, f"scene-{i}"))
    return out


def test_train_validate_finetune(tmp_path, monkeypatch):
    from labelassist.backends.detect.yolo import YoloDetector
    from labelassist.backends.train import train_detector, validate_detector, write_dataset

    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # nothing may be written to the working directory
    data = write_dataset(_samples(24), list(CLASSES), tmp_path / "data", "detect", val_fraction=0.25, seed=0)
    events = []
    result = train_detector(data, "yolov8n.yaml", tmp_path / "run", epochs=2, imgsz=128, progress=events.append)
    assert [e["epoch"] for e in events] == [1, 2]
    assert all(e["epochs"] == 2 for e in events)
    assert all(0.0 <= e["metrics"]["map50"] <= 1.0 for e in events)
    assert result.weights.is_file() and result.seconds > 0 and result.epochs == 2
    assert 0.0 <= result.metrics["map50_95"] <= result.metrics["map50"] <= 1.0

    det = YoloDetector.from_weights(result.weights, device="cpu")
    assert det.task == "detect" and set(det.class_names.values()) == set(CLASSES)

    metrics = validate_detector(result.weights, data, imgsz=128)
    assert set(metrics) >= {"map50", "map50_95"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert list((tmp_path / "cwd").iterdir()) == []

    tuned_events = []
    tuned = train_detector(data, result.weights, tmp_path / "tune", epochs=1, imgsz=128,
                           progress=tuned_events.append)
    assert [e["epoch"] for e in tuned_events] == [1]
    assert tuned.weights.is_file() and tuned.weights != result.weights
    YoloDetector.from_weights(tuned.weights, device="cpu")
    assert all(0.0 <= v <= 1.0 for v in validate_detector(tuned.weights, data, imgsz=128).values())


def test_missing_base_weights_is_not_downloaded(tmp_path):
    from labelassist.backends.train import train_detector

    with pytest.raises(FileNotFoundError):
        train_detector(tmp_path / "data.yaml", "yolov8n.pt", tmp_path / "run", epochs=1, imgsz=64)


def test_publish_trained_weights_to_registry(tmp_path):
    """The registry with the real validator: trained weights publish; a truncated copy does not."""
    from labelassist.backends.detect.yolo import YoloDetector
    from labelassist.backends.registry import ModelRegistry, RegistryError
    from labelassist.backends.train import train_detector, write_dataset

    data = write_dataset(_samples(8), list(CLASSES), tmp_path / "data", "detect", val_fraction=0.25)
    result = train_detector(data, "yolov8n.yaml", tmp_path / "run", epochs=1, imgsz=64)
    reg = ModelRegistry(tmp_path / "reg")
    vid = reg.publish(result.weights, result.metrics, validate=YoloDetector.from_weights)
    reg.promote(vid)
    assert YoloDetector.from_weights(reg.current().weights).task == "detect"
    broken = tmp_path / "broken.pt"
    broken.write_bytes(result.weights.read_bytes()[:5000])
    with pytest.raises(RegistryError):
        reg.publish(broken, {}, validate=YoloDetector.from_weights)
    assert [v.version_id for v in reg.versions()] == [vid] and reg.current().version_id == vid
