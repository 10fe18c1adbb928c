"""`labelassist serve` as a user starts it: gunicorn in its own process, settings from the environment."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from label_studio_sdk.converter.brush import decode_rle

from labelassist.settings import Settings
from servers import png_bytes, serving, upload_server
from synthetic import make_scene

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_starts_gunicorn_on_the_embedded_default_and_answers_a_click(tmp_path):
    scene = make_scene(seed=5, size=(300, 400), n_objects=4, mode="rgb")
    obj = scene.objects[0]
    x0, y0, x1, y1 = obj.bbox
    files = {"1/scene.png": png_bytes(scene.image)}
    port = _free_port()
    with serving(upload_server(files)) as media:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SAM_", "SEGMENTER"))}
        env.update(PORT=str(port), LABEL_STUDIO_URL=media, MEDIA_CACHE_DIR=str(tmp_path / "media"),
                   LABEL_STUDIO_API_KEY="a-secret-token-value", THREADS="4")
        proc = subprocess.Popen([sys.executable, "-m", "labelassist.cli", "serve"], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.time() + 60
            while True:
                try:
                    health = requests.get(f"{url}/health", timeout=5)
                    break
                except (requests.ConnectionError, requests.Timeout):
                    assert proc.poll() is None and time.time() < deadline, "server did not start"
                    time.sleep(0.3)
            assert health.json()["segmenter"] == "GrabCutSegmenter"
            config = ('<View><Image name="img" value="$image"/>'
                      '<RectangleLabels name="r" toName="img" smart="true"><Label value="Part"/></RectangleLabels>'
                      '<BrushLabels name="b" toName="img"><Label value="Part"/></BrushLabels></View>')
            w, h = 400, 300
            box = {"from_name": "r", "to_name": "img", "type": "rectanglelabels",
                   "value": {"x": x0 * 100 / w, "y": y0 * 100 / h, "width": (x1 - x0) * 100 / w,
                             "height": (y1 - y0) * 100 / h, "rectanglelabels": ["Part"]}}
            resp = requests.post(f"{url}/predict", timeout=60, json={
                "tasks": [{"id": 1, "data": {"image": "/data/upload/1/scene.png"}}], "label_config": config,
                "params": {"context": {"result": [box]}}})
            assert resp.status_code == 200, resp.text
            (result,) = resp.json()["results"][0]["result"]
            mask = decode_rle(result["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 127
            iou = (mask & obj.mask).sum() / (mask | obj.mask).sum()
            assert iou > 0.8
        finally:
            proc.terminate()
            out, _ = proc.communicate(timeout=20)
    assert "a-secret-token-value" not in out
    assert "Booting worker" in out or "Listening at" in out


def test_readme_documents_every_setting():
    readme = (ROOT / "README.md").read_text()
    missing = [name.upper() for name in Settings.model_fields if f"`{name.upper()}`" not in readme]
    assert not missing, f"settings missing from the README: {missing}"


def test_settings_are_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("EMBEDDING_CACHE_BYTES", "12345")
    monkeypatch.setenv("SEGMENTER", "grabcut")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "tok")
    s = Settings()
    assert s.embedding_cache_bytes == 12345 and s.segmenter == "grabcut"
    assert "tok" not in repr(s)


def test_serve_refuses_to_start_with_corrupt_weights(tmp_path):
    (tmp_path / "yolo.pt").write_bytes(b"\x80\x02truncated")
    env = dict(os.environ, MODELS_DIR=str(tmp_path), YOLO_WEIGHTS="yolo.pt", PORT=str(_free_port()))
    proc = subprocess.run([sys.executable, "-m", "labelassist.cli", "serve"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "cannot start" in proc.stderr and "yolo.pt" in proc.stderr
    assert "Traceback" not in proc.stderr
