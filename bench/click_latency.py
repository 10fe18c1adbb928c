"""Click latency with Segment Anything's vit_b architecture at 1024 px, on whatever device is there.

Prints, from one run:
  - image encoder time (the expensive, cacheable part),
  - bare mask-decoder time (the floor for a click),
  - a cached click's round trip through the HTTP server (fetch skipped, embedding reused),
  - a recompute-per-click click's round trip (embedding cache off: what older backends do),
  - the ratio recompute / cached.
Weights are random (no download): compute cost is the architecture's, not the checkpoint's.
Run: .venv/bin/python bench/click_latency.py [--clicks 20] [--recompute-clicks 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import torch
from label_studio_sdk.converter.brush import mask2rle
from segment_anything import build_sam_vit_b

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from servers import png_bytes, serving, upload_server  # noqa: E402

from labelassist.adapters.label_studio.app import create_app  # noqa: E402
from labelassist.adapters.label_studio.media import MediaFetcher  # noqa: E402
from labelassist.adapters.label_studio.service import Service  # noqa: E402
from labelassist.backends.segment.sam import SamSegmenter, resolve_device  # noqa: E402
from labelassist.backends.types import Prompt  # noqa: E402
from labelassist.settings import Settings  # noqa: E402

CONFIG = """<View><Image name="image" value="$image"/>
<KeyPointLabels name="kp" toName="image" smart="true"><Label value="Object"/></KeyPointLabels>
<BrushLabels name="brush" toName="image"><Label value="Object"/></BrushLabels></View>"""


def click_body(i: int) -> dict:
    kp = {"from_name": "kp", "to_name": "image", "type": "keypointlabels", "is_positive": True,
          "original_width": 1024, "original_height": 1024,
          "value": {"x": 4 + (i % 30) * 2, "y": 50, "keypointlabels": ["Object"]}}
    return {"tasks": [{"id": 1, "data": {"image": "/data/upload/1/bench.png"}}], "label_config": CONFIG,
            "params": {"context": {"result": [kp]}}}


def timed_clicks(url: str, n: int) -> list[float]:
    out = []
    with requests.Session() as s:
        for i in range(n):
            t = time.perf_counter()
            r = s.post(f"{url}/predict", json=click_body(i), timeout=300)
            out.append(time.perf_counter() - t)
            r.raise_for_status()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clicks", type=int, default=20)
    ap.add_argument("--recompute-clicks", type=int, default=3)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    device = resolve_device(args.device)
    model = build_sam_vit_b(checkpoint=None)
    seg = SamSegmenter(model, "sam-vit_b-random", device, fp16_embeddings=True)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()}")

    seg.embed(image)  # warm-up (allocations, kernels)
    enc = []
    for _ in range(2):
        t = time.perf_counter()
        emb = seg.embed(image)
        if device.type == "cuda":
            torch.cuda.synchronize()
        enc.append(time.perf_counter() - t)
    dec, rle, runs = [], [], []
    for i in range(args.clicks):
        t = time.perf_counter()
        region = seg.segment(emb, Prompt(points=((40.96 + (i % 30) * 20.48, 512.0),), positive=(True,)))
        dec.append(time.perf_counter() - t)
        t = time.perf_counter()
        mask2rle(region.geometry.astype(np.uint8) * 255)
        rle.append(time.perf_counter() - t)
        runs.append(int(np.count_nonzero(np.diff(region.geometry.ravel().astype(np.int8)))))

    files = {"1/bench.png": png_bytes(image)}
    with tempfile.TemporaryDirectory() as tmp, serving(upload_server(files)) as media:
        settings = Settings(label_studio_url=media, media_cache_dir=Path(tmp) / "media")
        cached_service = Service(seg, MediaFetcher(settings), 1 << 30)
        with serving(create_app(settings, cached_service)) as url:
            first = timed_clicks(url, 1)[0]
            cached = timed_clicks(url, args.clicks)
        recompute_service = Service(seg, MediaFetcher(settings), 0)  # bound 0: nothing is kept
        with serving(create_app(settings, recompute_service)) as url:
            recompute = timed_clicks(url, args.recompute_clicks)

    ms = lambda xs: statistics.median(xs) * 1000  # noqa: E731
    print(f"encoder (vit_b, 1024 px)         : {ms(enc):9.1f} ms  (median of {len(enc)})")
    print(f"mask decoder alone               : {ms(dec):9.1f} ms  (median of {len(dec)})")
    print(f"brush RLE of the same masks      : {ms(rle):9.1f} ms  (median; masks have a median of "
          f"{int(statistics.median(runs))} runs: random weights give ragged masks, a trained checkpoint's "
          f"are smooth and cheaper to encode)")
    print(f"first click, cold cache (HTTP)   : {first * 1000:9.1f} ms")
    print(f"cached click round trip (HTTP)   : {ms(cached):9.1f} ms  (median of {len(cached)}, "
          f"p95 {np.percentile(cached, 95) * 1000:.1f} ms)")
    print(f"recompute-per-click click (HTTP) : {ms(recompute):9.1f} ms  (median of {len(recompute)})")
    print(f"ratio recompute / cached         : {ms(recompute) / ms(cached):9.1f}x")
    print(f"ratio cached click / bare decoder: {ms(cached) / ms(dec):9.1f}x")

    # The embedded default, for comparison: same image size, a box around a synthetic object.
    from synthetic import make_scene

    from labelassist.backends.segment.grabcut import GrabCutSegmenter

    scene = make_scene(seed=3, size=(1024, 1024), n_objects=6, mode="rgb")
    gc = GrabCutSegmenter()
    gc.embed(scene.image)
    t = time.perf_counter()
    gc_emb = gc.embed(scene.image)
    gc_embed = time.perf_counter() - t
    gc_clicks = []
    for obj in scene.objects:
        t = time.perf_counter()
        gc.segment(gc_emb, Prompt(box=tuple(float(v) for v in obj.bbox)))
        gc_clicks.append(time.perf_counter() - t)
    print(f"grabcut embed (1024 px)          : {gc_embed * 1000:9.1f} ms")
    print(f"grabcut box click (segment only) : {ms(gc_clicks):9.1f} ms  (median of {len(gc_clicks)})")


if __name__ == "__main__":
    main()
