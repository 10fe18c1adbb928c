"""Click latency under load: N simulated annotators clicking at once against ONE server.

The server is the real thing: `python -m labelassist.cli serve` (gunicorn, WORKERS x THREADS) on
loopback, reading images from a stand-in Label Studio media server run by this script. Every
image's embedding is computed before the timed part (one untimed click per image, checked on
/metrics), so every timed click is a cached click: download, decode and encoder are all skipped,
what remains is the segmenter's per-click work, the mask's brush RLE and polygon, JSON and HTTP.

Each annotator is a thread with its own HTTP session, clicking its own image (annotator i clicks
image i mod --images) with no pause between clicks (--think adds one): a closed loop, so at high N
the figures show the server saturated, not a typical team. The annotator threads run on the same
machine as the server and take some of its CPU.

Printed: for N in --levels, the median and 95th percentile round trip, the throughput (clicks per
second over the level's wall time), and the ratio of the median round trip to the bare segmenter
(`segment()` alone, on the same embeddings and prompts, sequentially in this process, same run).

  .venv/bin/python bench/load.py                      # grabcut (the embedded default), 1024 px
  .venv/bin/python bench/load.py --sam                # SAM vit_b architecture, random weights
  .venv/bin/python bench/load.py --levels 1,4 --clicks 10 --threads 4
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from servers import free_port, png_bytes, serving, upload_server  # noqa: E402

from labelassist.backends.types import Prompt  # noqa: E402

CONFIG = """<View><Image name="image" value="$image"/>
<KeyPointLabels name="kp" toName="image" smart="true"><Label value="Object"/></KeyPointLabels>
<BrushLabels name="brush" toName="image"><Label value="Object"/></BrushLabels></View>"""


def click_body(name: str, x: float, y: float, w: int, h: int) -> dict:
    kp = {"from_name": "kp", "to_name": "image", "type": "keypointlabels", "is_positive": True,
          "original_width": w, "original_height": h,
          "value": {"x": x * 100 / w, "y": y * 100 / h, "width": 0.5, "keypointlabels": ["Object"]}}
    return {"tasks": [{"id": 1, "data": {"image": f"/data/upload/1/{name}"}}], "label_config": CONFIG,
            "params": {"context": {"result": [kp]}}}


def make_images(n: int, size: int, sam: bool) -> list[tuple[np.ndarray, list[tuple[float, float]]]]:
    """(image, click points): synthetic scenes with a point inside each object (grabcut), or noise
    with a grid of points (SAM with random weights segments anything the same)."""
    from synthetic import interior_point, make_scene

    out = []
    for i in range(n):
        if sam:
            image = np.random.default_rng(i).integers(0, 255, (size, size, 3), dtype=np.uint8)
            points = [(size * (0.2 + 0.15 * k), size * 0.5) for k in range(5)]
        else:
            scene = make_scene(seed=100 + i, size=(size, size), n_objects=6, mode="rgb")
            image = scene.image
            points = [interior_point(o.mask) for o in scene.objects]
        out.append((image, [(float(x), float(y)) for x, y in points]))
    return out


def bare_segment_times(segmenter, images, repeats: int) -> dict[tuple[int, int], float]:
    """(image, point) -> median seconds of `segment()` alone for that click."""
    times = {}
    for k, (image, points) in enumerate(images):
        emb = segmenter.embed(image)
        segmenter.segment(emb, Prompt(points=(points[0],), positive=(True,)))  # warm-up, untimed
        for j, (x, y) in enumerate(points):
            runs = []
            for _ in range(repeats):
                t = time.perf_counter()
                segmenter.segment(emb, Prompt(points=((x, y),), positive=(True,)))
                runs.append(time.perf_counter() - t)
            times[k, j] = statistics.median(runs)
    return times


def clicks_of(n: int, clicks: int, images) -> list[tuple[int, int]]:
    """The (image, point) clicks a level with n annotators makes (see `run_level`)."""
    return [(i % len(images), (i + c) % len(images[i % len(images)][1])) for i in range(n) for c in range(clicks)]


def start_server(env: dict, log_path: Path, timeout: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    full = {k: v for k, v in os.environ.items() if not k.startswith(("SAM_", "YOLO_", "SEGMENTER", "REDIS_URL"))}
    full.update(HOST="127.0.0.1", PORT=str(port), PYTHONUNBUFFERED="1", LOG_LEVEL="WARNING", **env)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "labelassist.cli", "serve"], cwd=log_path.parent, env=full,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while True:
        try:
            if requests.get(f"{url}/health", timeout=2).ok:
                return proc, url
        except requests.RequestException:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            sys.exit(f"the server did not start; its log:\n{log_path.read_text(errors='replace')}")
        time.sleep(0.3)


def metric(url: str, name: str) -> float:
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return float("nan")


def run_level(url: str, n: int, clicks: int, images, size: int, think: float) -> tuple[list[float], float]:
    latencies: list[list[float]] = [[] for _ in range(n)]
    errors: list[str] = []
    barrier = threading.Barrier(n + 1)

    def annotator(i: int) -> None:
        k = i % len(images)
        points = images[k][1]
        with requests.Session() as s:
            s.post(f"{url}/predict", json=click_body(f"img{k}.png", *points[0], size, size), timeout=600)
            barrier.wait()
            for c in range(clicks):  # the same clicks as clicks_of()
                x, y = points[(i + c) % len(points)]
                t = time.perf_counter()
                r = s.post(f"{url}/predict", json=click_body(f"img{k}.png", x, y, size, size), timeout=600)
                latencies[i].append(time.perf_counter() - t)
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
                if think:
                    time.sleep(think)

    threads = [threading.Thread(target=annotator, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()  # every annotator has its session open and has clicked once (untimed)
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        sys.exit(f"{len(errors)} clicks failed, e.g. {errors[0]}")
    return [x for per in latencies for x in per], wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sam", action="store_true", help="SAM vit_b architecture with random weights (needs the sam extra)")
    ap.add_argument("--levels", default="1,2,4,8,16", help="numbers of concurrent annotators")
    ap.add_argument("--clicks", type=int, help="timed clicks per annotator per level (default 20; 8 with --sam)")
    ap.add_argument("--images", type=int, help="distinct images (default 8; 2 with --sam)")
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels")
    ap.add_argument("--threads", type=int, default=8, help="server THREADS (gunicorn gthread)")
    ap.add_argument("--think", type=float, default=0.0, help="seconds each annotator pauses after a click")
    args = ap.parse_args()
    levels = [int(v) for v in args.levels.split(",") if v.strip()]
    clicks = args.clicks or (8 if args.sam else 20)
    n_images = args.images or (2 if args.sam else 8)
    images = make_images(n_images, args.size, args.sam)
    files = {f"1/img{k}.png": png_bytes(image) for k, (image, _) in enumerate(images)}

    with tempfile.TemporaryDirectory(prefix="labelassist-load-") as tmp:
        tmp = Path(tmp)
        env = {"THREADS": str(args.threads), "WORKERS": "1", "MEDIA_CACHE_DIR": str(tmp / "media"),
               "REGISTRY_DIR": str(tmp / "registry"), "WARM_CACHE_ON_PREDICT": "false"}
        if args.sam:
            import torch
            from segment_anything import build_sam_vit_b

            from labelassist.backends.segment.sam import SamSegmenter

            model = build_sam_vit_b(checkpoint=None)
            checkpoint = tmp / "sam_vit_b_random.pth"
            torch.save(model.state_dict(), checkpoint)
            segmenter = SamSegmenter(model, "sam-vit_b-random", "cpu")
            env.update(SEGMENTER="sam", SAM_CHECKPOINT=str(checkpoint), SAM_MODEL_TYPE="vit_b", DEVICE="cpu")
            name = f"SAM vit_b (random weights), cpu, torch threads {torch.get_num_threads()}"
        else:
            from labelassist.backends.segment.grabcut import GrabCutSegmenter

            segmenter = GrabCutSegmenter()
            env.update(SEGMENTER="grabcut")
            name = "grabcut (embedded default)"

        with serving(upload_server(files)) as media:
            env["LABEL_STUDIO_URL"] = media
            proc, url = start_server(env, tmp / "server.log", timeout=300)
            try:
                t = time.perf_counter()
                for k, (_, points) in enumerate(images):  # embeddings first: every timed click is cached
                    requests.post(f"{url}/predict", json=click_body(f"img{k}.png", *points[0], args.size, args.size),
                                  timeout=600).raise_for_status()
                warm = time.perf_counter() - t
                runs = metric(url, "labelassist_embedding_encoder_runs_total")
                bare = bare_segment_times(segmenter, images, repeats=3)
                rows = []
                for n in levels:
                    lat, wall = run_level(url, n, clicks, images, args.size, args.think)
                    same = statistics.median(bare[c] for c in clicks_of(n, clicks, images))
                    rows.append((n, len(lat), statistics.median(lat), float(np.percentile(lat, 95)), len(lat) / wall,
                                 same))
                after = metric(url, "labelassist_embedding_encoder_runs_total")
            finally:
                proc.terminate()
                proc.wait(30)

    every = list(bare.values())
    print(f"segmenter: {name}; images {n_images} x {args.size} px; server: 1 gunicorn worker x {args.threads} "
          f"threads; {os.cpu_count()} CPU cores (server, annotators and media server share them)")
    print(f"embeddings: {n_images} computed in {warm:.1f} s before timing (encoder runs {runs:.0f}, "
          f"{after - runs:.0f} more during the timed clicks)")
    print(f"bare segment() alone: median {statistics.median(every) * 1000:.1f} ms over all {len(every)} clicks "
          f"(each the median of 3 runs, sequential, in this process); a level's ratio "
          f"uses the median over the clicks that level makes")
    print(f"think time {args.think:g} s (closed loop)\n")
    print("| annotators | clicks | p50 ms | p95 ms | clicks/s | bare segment() ms | p50 / bare |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n, count, p50, p95, tput, same in rows:
        print(f"| {n} | {count} | {p50 * 1000:.1f} | {p95 * 1000:.1f} | {tput:.1f} | {same * 1000:.1f} | "
              f"{p50 / same:.2f}x |")


if __name__ == "__main__":
    main()
