"""Label Studio annotations -> Regions (pixels) -> YOLO data sets, with a stable split by image."""
from __future__ import annotations

import numpy as np
import pytest
import yaml
from label_studio_sdk.converter.brush import mask2rle

from labelassist.adapters.label_studio.dataset import (class_names, group_keypoints, latest_annotation,
                                                       result_to_regions, tasks_to_samples)
from labelassist.backends.train import label_lines, split_of, write_dataset
from labelassist.backends.types import Region

W, H = 200, 100
CONFIG = """<View>
  <Image name="img" value="$image"/>
  <RectangleLabels name="box" toName="img"><Label value="cat"/><Label value="dog"/></RectangleLabels>
  <PolygonLabels name="poly" toName="img"><Label value="cat"/><Label value="dog"/></PolygonLabels>
  <BrushLabels name="brush" toName="img"><Label value="cat"/></BrushLabels>
  <KeyPointLabels name="kp" toName="img"><Label value="nose"/><Label value="tail"/></KeyPointLabels>
  <Choices name="scene" toName="img"><Choice value="indoor"/><Choice value="outdoor"/></Choices>
</View>"""


def _res(rtype: str, value: dict, from_name: str = "box", **kw) -> dict:
    return dict({"id": "r1", "type": rtype, "from_name": from_name, "to_name": "img",
                 "original_width": W, "original_height": H, "image_rotation": 0, "value": value}, **kw)


def test_rectangle_axis_aligned_and_rotated():
    (r,) = result_to_regions(_res("rectanglelabels", {"x": 10, "y": 20, "width": 25, "height": 30,
                                                      "rotation": 0, "rectanglelabels": ["cat"]}))
    assert r.kind == "box" and r.label == "cat"
    assert np.allclose(r.geometry, (20, 20, 70, 50, 0))
    # 90 degrees clockwise about the top-left corner (y points down): the width axis points down.
    (r,) = result_to_regions(_res("rectanglelabels", {"x": 50, "y": 10, "width": 10, "height": 20,
                                                      "rotation": 90, "rectanglelabels": ["dog"]}))
    assert np.allclose(r.geometry, (100, 10, 120, 30, 90))
    assert np.allclose(r.extra["corners"], [[100, 10], [100, 30], [80, 30], [80, 10]], atol=1e-9)
    assert np.allclose(r.extra["bounds"], (80, 10, 100, 30))
    # 30 degrees: the second corner is the first plus w * (cos 30, sin 30).
    (r,) = result_to_regions(_res("rectanglelabels", {"x": 10, "y": 10, "width": 20, "height": 10,
                                                      "rotation": 30, "rectanglelabels": ["dog"]}))
    c = r.extra["corners"]
    assert np.allclose(c[0], (20, 10)) and np.allclose(c[1], (20 + 40 * np.cos(np.pi / 6), 10 + 40 * 0.5))
    assert np.allclose(c[3], (20 - 10 * 0.5, 10 + 10 * np.cos(np.pi / 6)))


def test_polygon_keypoint_choices():
    (p,) = result_to_regions(_res("polygonlabels", {"points": [[10, 10], [50, 10], [50, 80]],
                                                    "polygonlabels": ["dog"]}, "poly"))
    assert p.kind == "polygon" and p.label == "dog"
    assert np.allclose(p.geometry, [[20, 10], [100, 10], [100, 80]])
    (k,) = result_to_regions(_res("keypointlabels", {"x": 25, "y": 50, "width": 0.5,
                                                     "keypointlabels": ["nose"]}, "kp"))
    assert k.kind == "keypoints" and k.label == "nose" and np.allclose(k.geometry, [[50, 50, 2]])
    cs = result_to_regions({"type": "choices", "from_name": "scene", "to_name": "img",
                            "value": {"choices": ["indoor", "outdoor"]}})
    assert [(c.kind, c.label, c.geometry) for c in cs] == [("class", "indoor", None), ("class", "outdoor", None)]
    # Rotated frames and results without size cannot be placed: skipped, not guessed.
    assert result_to_regions(_res("polygonlabels", {"points": [[1, 1], [2, 1], [2, 2]]}, image_rotation=90)) == []
    bad = _res("polygonlabels", {"points": [[1, 1], [2, 1], [2, 2]]})
    del bad["original_width"]
    assert result_to_regions(bad) == []


def test_brush_rle_round_trip():
    mask = np.zeros((H, W), np.uint8)
    mask[10:30, 20:50] = 255
    (r,) = result_to_regions(_res("brushlabels", {"format": "rle", "rle": mask2rle(mask),
                                                  "brushlabels": ["cat"]}, "brush"))
    assert r.kind == "polygon" and r.label == "cat"
    assert np.array_equal(r.extra["mask"], mask > 0)
    # The outline runs through the centres of the boundary pixels.
    p = r.geometry
    assert np.allclose([p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()], [20.5, 10.5, 49.5, 29.5])
    # Segment label line from the brush region: normalised outline.
    (line,) = label_lines([r], ["cat"], W, H, "segment")
    vals = np.array(line.split()[1:], float).reshape(-1, 2)
    assert line.startswith("0 ") and np.allclose(vals * [W, H], p, atol=1e-4)


def _task(tid, annotations, image="/data/a.png"):
    return {"id": tid, "data": {"image": image}, "annotations": annotations}


def _ann(aid, label, updated, cancelled=False):
    return {"id": aid, "was_cancelled": cancelled, "updated_at": updated, "created_at": updated,
            "result": [_res("rectanglelabels", {"x": 0, "y": 0, "width": 50, "height": 50,
                                                "rectanglelabels": [label]})]}


def test_cancelled_skipped_and_latest_wins():
    tasks = [
        _task(1, [_ann(1, "cat", "2024-01-01T10:00:00Z"), _ann(2, "dog", "2024-01-02T10:00:00Z")], "/d/1.png"),
        _task(2, [_ann(3, "cat", "2024-01-01T10:00:00Z"), _ann(4, "dog", "2024-03-01T10:00:00Z", True)], "/d/2.png"),
        _task(3, [_ann(5, "dog", "2024-01-01T10:00:00Z", True)], "/d/3.png"),
        _task(4, [], "/d/4.png"),
    ]
    assert latest_annotation(tasks[2]) is None
    samples = tasks_to_samples(tasks, CONFIG)
    assert [(s.task_id, s.annotation_id, s.image) for s in samples] == [(1, 2, "/d/1.png"), (2, 3, "/d/2.png")]
    assert [r.label for r in samples[0].regions] == ["dog"] and [r.label for r in samples[1].regions] == ["cat"]
    assert (samples[0].width, samples[0].height) == (W, H)
    assert class_names(CONFIG, ["box"]) == ["cat", "dog"]
    # Only the chosen controls.
    assert tasks_to_samples(tasks, CONFIG, controls=["poly"])[0].regions == ()


def test_group_keypoints_into_pose_instances():
    box = result_to_regions(_res("rectanglelabels", {"x": 10, "y": 10, "width": 40, "height": 60,
                                                     "rectanglelabels": ["cat"]}))
    pts = [result_to_regions(_res("keypointlabels", {"x": x, "y": y, "keypointlabels": [n]}, "kp"))[0]
           for x, y, n in ((20, 30, "tail"), (15, 20, "nose"), (90, 90, "nose"))]  # the last is outside
    (inst,) = group_keypoints(box + pts, ["nose", "tail"])
    assert inst.kind == "keypoints" and inst.label == "cat"
    assert np.allclose(inst.geometry, [[30, 20, 2], [40, 30, 2]])
    assert np.allclose(inst.extra["box"], (20, 10, 100, 70))
    (line,) = label_lines([inst], ["cat"], W, H, "pose", 2)
    v = np.array(line.split()[1:], float)
    assert np.allclose(v[:4], [0.3, 0.4, 0.4, 0.6]) and np.allclose(v[4:], [0.15, 0.2, 2, 0.2, 0.3, 2])


def test_label_lines_detect_segment_pose():
    regions = [Region("a", "box", (20, 10, 60, 50, 0.0)),
               Region("b", "polygon", np.array([[0, 0], [100, 0], [100, 50]])),
               Region("zzz", "box", (0, 0, 10, 10, 0.0)),  # unknown label: skipped
               Region("a", "class", None)]
    assert label_lines(regions, ["a", "b"], W, H, "detect") == [
        "0 0.200000 0.300000 0.200000 0.400000", "1 0.250000 0.250000 0.500000 0.500000"]
    seg = label_lines(regions, ["a", "b"], W, H, "segment")
    assert seg[0] == "0 0.100000 0.100000 0.300000 0.100000 0.300000 0.500000 0.100000 0.500000"
    assert seg[1] == "1 0.000000 0.000000 0.500000 0.000000 0.500000 0.500000"
    # Rotated box for detect: its axis-aligned bounds.
    rot = Region("a", "box", (100, 10, 120, 30, 90.0))
    assert label_lines([rot], ["a"], W, H, "detect") == ["0 0.450000 0.200000 0.100000 0.200000"]
    # Pose: invisible points are written as 0 0 0; the box comes from the visible ones when absent.
    kp = Region("a", "keypoints", np.array([[20, 10, 2], [0, 0, 0], [60, 50, 1]]))
    assert label_lines([kp], ["a"], W, H, "pose", 3) == [
        "0 0.200000 0.300000 0.200000 0.400000 0.100000 0.100000 2.000000 0.000000 0.000000 0.000000 "
        "0.300000 0.500000 2.000000"]


def _img(i):
    return np.full((32, 48, 3), i % 255, np.uint8)


def test_write_dataset_detect_layout_and_stable_split(tmp_path):
    samples = [(_img(i), [Region("a", "box", (4, 4, 20, 20, 0.0))], f"task-{i}") for i in range(40)]
    data = write_dataset(samples, ["a", "b"], tmp_path / "ds", "detect", val_fraction=0.25, seed=3)
    cfg = yaml.safe_load(data.read_text())
    assert cfg["names"] == {0: "a", 1: "b"} and cfg["train"] == "images/train" and cfg["val"] == "images/val"
    root = tmp_path / "ds"

    def split_map(r):
        return {p.stem.rsplit("-", 1)[0]: split for split in ("train", "val")
                for p in (r / "images" / split).glob("*.png")}

    first = split_map(root)
    assert len(first) == 40 and 3 <= sum(v == "val" for v in first.values()) <= 20
    for split in ("train", "val"):
        for p in (root / "images" / split).glob("*.png"):
            lab = root / "labels" / split / (p.stem + ".txt")
            assert lab.read_text() == "0 0.250000 0.375000 0.333333 0.500000\n"
    assert all(first[f"task-{i}"] == split_of(f"task-{i}", 0.25, 3) for i in range(40))
    # Adding images never moves the old ones; rewriting replaces the folder's content.
    more = samples + [(_img(i), [], f"task-{i}") for i in range(40, 80)]
    write_dataset(more, ["a", "b"], root, "detect", val_fraction=0.25, seed=3)
    second = split_map(root)
    assert len(second) == 80 and all(second[k] == v for k, v in first.items())
    # Another seed gives another split; the same seed the same one.
    assert any(split_of(f"task-{i}", 0.25, 4) != first[f"task-{i}"] for i in range(40))


def test_write_dataset_tiny_set_gets_both_splits_and_pose_yaml(tmp_path):
    kp = Region("a", "keypoints", np.array([[5, 5, 2], [10, 10, 2]]), extra={"box": (2, 2, 20, 20)})
    samples = [(_img(i), [kp], f"x{i}") for i in range(2)]
    data = write_dataset(samples, ["a"], tmp_path / "p", "pose", val_fraction=0.01,
                         keypoint_names=["l", "r"], flip_idx=[1, 0])
    cfg = yaml.safe_load(data.read_text())
    assert cfg["kpt_shape"] == [2, 3] and cfg["flip_idx"] == [1, 0] and cfg["kpt_names"] == {0: ["l", "r"]}
    assert len(list((tmp_path / "p" / "images" / "val").iterdir())) == 1
    assert len(list((tmp_path / "p" / "images" / "train").iterdir())) == 1
    (lab,) = (tmp_path / "p" / "labels" / "val").iterdir()
    assert len(lab.read_text().split()) == 1 + 4 + 6


def test_write_dataset_paths_and_classify(tmp_path):
    import cv2

    src = tmp_path / "cat1.jpg"
    cv2.imwrite(str(src), np.zeros((40, 80, 3), np.uint8))
    data = write_dataset([(src, [Region("a", "box", (0, 0, 40, 20, 0.0))])], ["a"], tmp_path / "d", "detect",
                         val_fraction=0.0)
    (lab,) = (tmp_path / "d" / "labels" / "train").iterdir()
    assert lab.read_text() == "0 0.250000 0.250000 0.500000 0.500000\n"  # normalised by the file's size
    assert yaml.safe_load(data.read_text())["path"] == str((tmp_path / "d").resolve())
    root = write_dataset([(_img(i), [Region("b" if i % 2 else "a", "class", None)], f"c{i}") for i in range(6)],
                         ["a", "b"], tmp_path / "c", "classify", val_fraction=0.5)
    files = sorted(p.relative_to(root).parts[:2] for p in root.rglob("*.png"))
    assert len(files) == 6 and {f[1] for f in files} == {"a", "b"}
    assert all((root / s / c).is_dir() for s in ("train", "val") for c in ("a", "b"))
    with pytest.raises(ValueError):
        write_dataset([(_img(0), [], "same"), (_img(1), [], "same")], ["a"], tmp_path / "e")
