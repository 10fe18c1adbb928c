"""The embedding cache shared through Redis (REDIS_URL): a real redis-server, and for the end-to-end
test two real `labelassist serve` processes (gunicorn) in front of it."""
from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import redis
import requests
import torch

from labelassist.backends.segment import EmbeddingFormatError
from labelassist.backends.segment.base import pack_arrays, unpack_arrays
from labelassist.backends.segment.grabcut import GrabCutSegmenter
from labelassist.backends.segment.sam import SamSegmenter
from labelassist.backends.shared_cache import SharedEmbeddingCache
from labelassist.backends.types import Prompt
from servers import free_port, png_bytes, redis_server, serving, upload_server
from synthetic import make_scene
from tiny_models import tiny_sam

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture()
def client(redis_url):
    c = redis.Redis.from_url(redis_url)
    c.flushdb()
    return c


@pytest.fixture(scope="module")
def sam():
    return SamSegmenter(tiny_sam(), "sam-tiny", "cpu", fp16_embeddings=True)


def _image(h=180, w=240, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


CLICK = Prompt(points=((100, 90),), positive=(True,))


# --- serialisation ------------------------------------------------------------------------------
def test_sam_round_trip_gives_the_same_masks(sam):
    emb = sam.embed(_image())
    back = sam.load_embedding(sam.dump_embedding(emb))
    assert back.image_size == emb.image_size and back.nbytes == emb.nbytes
    assert back.data.features.dtype == torch.float16 and torch.equal(back.data.features, emb.data.features)
    for prompt in (CLICK, Prompt(box=(50, 40, 150, 120))):
        assert np.array_equal(sam.segment(emb, prompt).geometry, sam.segment(back, prompt).geometry)


def test_float32_embeddings_travel_as_fp16():
    seg = SamSegmenter(tiny_sam(), "sam-tiny", "cpu", fp16_embeddings=False)
    emb = seg.embed(_image())
    assert emb.data.features.dtype == torch.float32
    blob = seg.dump_embedding(emb, fp16=True)
    _, arrays = unpack_arrays(blob)
    assert arrays["features"].dtype == np.float16 and arrays["input_size"].dtype == np.int32
    assert len(blob) < emb.nbytes * 0.6
    back = seg.load_embedding(blob)
    assert back.data.features.dtype == torch.float32  # what this segmenter computes with
    assert torch.allclose(back.data.features, emb.data.features, rtol=1e-3, atol=1e-3)
    assert seg.load_embedding(seg.dump_embedding(emb, fp16=False)).data.features.equal(emb.data.features)


@pytest.mark.parametrize("mode", ["rgb", "gray8"])
def test_grabcut_round_trip_gives_the_same_masks(mode):
    scene = make_scene(seed=3, size=(300, 1400), n_objects=4, mode=mode)  # shrunk to max_side: scale != 1
    seg = GrabCutSegmenter()
    emb = seg.embed(scene.image)
    back = seg.load_embedding(seg.dump_embedding(emb))
    assert back.image_size == emb.image_size and back.nbytes == emb.nbytes
    assert back.data.scale == emb.data.scale
    assert (back.data.features is back.data.image) == (emb.data.features is emb.data.image)
    assert not back.data.image.flags.writeable
    box = Prompt(box=tuple(float(v) for v in scene.objects[0].bbox))
    assert np.array_equal(seg.segment(emb, box).geometry, seg.segment(back, box).geometry)


def test_foreign_bytes_are_refused_with_a_format_error(sam):
    blob = sam.dump_embedding(sam.embed(_image()))
    other = SamSegmenter(tiny_sam(), "sam-other", "cpu")
    gc = GrabCutSegmenter()
    bad = {
        "empty": b"",
        "pickle": pickle.dumps({"features": np.zeros(3)}),
        "truncated": blob[: len(blob) // 2],
        "bad header": blob[:12] + b"{not json" + blob[21:],
        "object dtype": pack_arrays({"model_id": "sam-tiny", "image_size": [180, 240]},
                                    {"features": np.zeros((1, 256, 16, 16), np.float16),
                                     "input_size": np.array([192, 256], np.int32)}).replace(b'"<f2"', b'"|O8"'),
        "wrong shape": pack_arrays({"model_id": "sam-tiny", "image_size": [180, 240]},
                                   {"features": np.zeros((1, 256, 8, 8), np.float16),
                                    "input_size": np.array([192, 256], np.int32)}),
        "wrong image size": pack_arrays({"model_id": "sam-tiny", "image_size": [999, 240]},
                                        {"features": np.zeros((1, 256, 16, 16), np.float16),
                                         "input_size": np.array([192, 256], np.int32)}),
    }
    for name, data in bad.items():
        with pytest.raises(EmbeddingFormatError):
            sam.load_embedding(data)
    with pytest.raises(EmbeddingFormatError, match="sam-other"):
        other.load_embedding(blob.replace(b"sam-tiny", b"sam-toyy"))
    with pytest.raises(EmbeddingFormatError):
        gc.load_embedding(blob)  # a SAM embedding is no grabcut embedding


# --- the Redis layer ----------------------------------------------------------------------------
def test_value_in_redis_is_compressed_fp16_with_a_ttl(client, redis_url):
    seg = SamSegmenter(tiny_sam(), "sam-tiny", "cpu", fp16_embeddings=False)
    cache = SharedEmbeddingCache(client, ttl=600)
    emb = seg.embed(_image())
    cache.put("sam-tiny:abc", emb, seg, background=False)
    (key,) = client.keys("labelassist:emb:*e:*")
    value = client.get(key)
    assert value[:1] == b"Z"
    raw = zlib.decompress(value[1:])
    assert len(value) < len(raw)  # compressed
    _, arrays = unpack_arrays(raw)
    assert arrays["features"].dtype == np.float16
    assert 590_000 < client.pttl(key) <= 600_000
    assert int(client.get("labelassist:emb:v1:bytes")) == len(value) == cache.used_bytes()
    assert cache.stats.writes == 1 and cache.stats.bytes_written == len(value)

    # Another replica (its own client and cache) reads it: a hit, no computation.
    other = SharedEmbeddingCache(redis.Redis.from_url(redis_url), ttl=600)
    got = other.get_or_compute("sam-tiny:abc", lambda: pytest.fail("computed despite the shared value"), seg)
    assert torch.allclose(got.data.features, emb.data.features, rtol=1e-3, atol=1e-3)
    assert other.stats.hits == 1 and other.stats.misses == 0


def test_a_hit_refreshes_the_ttl(client, sam):
    cache = SharedEmbeddingCache(client, ttl=600)
    cache.put("k", sam.embed(_image()), sam, background=False)
    key = "labelassist:emb:v1:e:k"
    client.pexpire(key, 1000)
    assert cache.get("k", sam) is not None
    assert client.pttl(key) > 590_000


def test_bound_evicts_least_recently_used_and_skips_oversized(client, sam):
    embs = {name: sam.embed(_image(seed=i)) for i, name in enumerate("abcd")}
    size = len(SharedEmbeddingCache(client).encode(embs["a"], sam))
    cache = SharedEmbeddingCache(client, max_bytes=int(size * 2.5))
    cache.put("a", embs["a"], sam, background=False)
    cache.put("b", embs["b"], sam, background=False)
    assert cache.get("a", sam) is not None  # "a" is now the most recently used
    cache.put("c", embs["c"], sam, background=False)  # over the bound: "b" goes
    assert cache.get("b", sam) is None
    assert cache.get("a", sam) is not None and cache.get("c", sam) is not None
    assert 0 < cache.used_bytes() <= cache.max_bytes
    assert client.zcard("labelassist:emb:v1:lru") == client.hlen("labelassist:emb:v1:size") == 2
    assert not client.exists("labelassist:emb:v1:e:b")

    small = SharedEmbeddingCache(client, max_bytes=size // 2)
    small.put("d", embs["d"], sam, background=False)
    assert small.stats.skipped == 1 and small.stats.writes == 0 and small.get("d", sam) is None


def test_expired_entries_leave_the_index(client, sam):
    cache = SharedEmbeddingCache(client, ttl=0.3)
    cache.put("a", sam.embed(_image(seed=1)), sam, background=False)
    deadline = time.time() + 10
    while client.exists("labelassist:emb:v1:e:a") and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.05)
    cache.put("b", sam.embed(_image(seed=2)), sam, background=False)  # a write tidies the index
    assert client.zrange("labelassist:emb:v1:lru", 0, -1) == [b"labelassist:emb:v1:e:b"]
    assert cache.used_bytes() == client.strlen("labelassist:emb:v1:e:b")


def test_corrupt_or_foreign_values_are_misses_not_crashes(client, sam):
    cache = SharedEmbeddingCache(client)
    good = cache.encode(sam.embed(_image()), sam)
    key = "labelassist:emb:v1:e:k"
    bomb = b"Z" + zlib.compress(b"\0" * (4 << 20))
    values = [b"garbage", b"Z" + b"not zlib", b"Z" + zlib.compress(b"not an embedding"),
              b"Z" + zlib.compress(pickle.dumps(object)), good[:-100], bomb, b"X" + good[1:],
              cache.encode(GrabCutSegmenter().embed(_image()), GrabCutSegmenter())]
    small = SharedEmbeddingCache(client, max_raw_bytes=1 << 20)
    for i, value in enumerate(values):
        client.set(key, value)
        assert small.get("k", sam) is None, i
    assert small.stats.corrupt == len(values)
    # get_or_compute computes and replaces the bad value
    client.set(key, b"garbage")
    emb = small.get_or_compute("k", lambda: sam.embed(_image()), sam)
    small.flush()
    assert emb is not None and small.stats.misses == 1 and small.stats.writes == 1
    assert small.get("k", sam) is not None


def test_redis_down_is_a_miss_not_a_crash(sam):
    port = free_port()  # nothing listens there
    cache = SharedEmbeddingCache.from_url(f"redis://127.0.0.1:{port}/0", retry_after=60)
    runs = []
    for _ in range(3):
        emb = cache.get_or_compute("k", lambda: runs.append(1) or sam.embed(_image()), sam)
        assert emb.image_size == (180, 240)
    cache.flush()
    assert len(runs) == 3 and cache.stats.misses == 3
    assert cache.stats.errors == 1  # then Redis is skipped for retry_after seconds
    assert cache.used_bytes() is None


def test_concurrent_misses_on_two_replicas_compute_once(redis_url, client, sam):
    replicas = [SharedEmbeddingCache(redis.Redis.from_url(redis_url)) for _ in range(2)]
    runs, results, errors = [], [], []
    gate = threading.Event()
    barrier = threading.Barrier(2)

    def compute():
        runs.append(1)
        gate.wait(10)
        return sam.embed(_image())

    def click(cache):
        try:
            barrier.wait(5)
            results.append(cache.get_or_compute("k", compute, sam))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=click, args=(c,)) for c in replicas]
    for t in threads:
        t.start()
    deadline = time.time() + 10
    while not runs and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # the other replica is polling by now
    gate.set()
    for t in threads:
        t.join(20)
    assert not errors and len(results) == 2 and len(runs) == 1
    # One computed it; the other waited for it (or, on a very slow machine, arrived after the write).
    assert sorted(c.stats.misses for c in replicas) == [0, 1]
    assert sum(c.stats.waits + c.stats.hits for c in replicas) == 1
    assert torch.equal(results[0].data.features, results[1].data.features)


def test_a_failed_computation_releases_the_lock(client, sam):
    cache = SharedEmbeddingCache(client, wait=30)
    with pytest.raises(RuntimeError):
        cache.get_or_compute("k", lambda: (_ for _ in ()).throw(RuntimeError("boom")), sam)
    assert not client.keys("labelassist:emb:v1:lock:*")
    assert cache.get_or_compute("k", lambda: sam.embed(_image()), sam) is not None


# --- two real server processes sharing one Redis -------------------------------------------------
CONFIG = """<View><Image name="image" value="$image"/>
<KeyPointLabels name="kp" toName="image" smart="true"><Label value="Object"/></KeyPointLabels>
<BrushLabels name="brush" toName="image"><Label value="Object"/></BrushLabels></View>"""

# `labelassist serve` with SAM's "vit_b" entry building the tiny model (real checkpoint loading
# code, a 2-block encoder): SAM_CHECKPOINT is a state dict saved from tiny_sam().
SERVE = """import sys
sys.path.insert(0, {tests!r})
from tiny_models import tiny_sam
from labelassist.backends.segment import sam
sam.sam_model_registry["vit_b"] = lambda checkpoint=None: tiny_sam(seed=1)
from labelassist.cli import main
sys.exit(main(["serve"]))
"""


def _click(url: str, name: str, x: float, y: float) -> dict:
    kp = {"from_name": "kp", "to_name": "image", "type": "keypointlabels", "is_positive": True,
          "original_width": 320, "original_height": 240,
          "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": ["Object"]}}
    resp = requests.post(f"{url}/predict", timeout=60, json={
        "tasks": [{"id": 1, "data": {"image": f"/data/upload/1/{name}"}}], "label_config": CONFIG,
        "params": {"context": {"result": [kp]}}})
    assert resp.status_code == 200, resp.text
    (result,) = resp.json()["results"][0]["result"]
    return result


def _metrics(url: str) -> dict[str, float]:
    text = requests.get(f"{url}/metrics", timeout=10).text
    return {name: float(v) for name, v in re.findall(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$", text, re.M)}


def _wait_until(cond, timeout=30.0, what="condition"):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.slow
def test_an_embedding_computed_by_one_replica_serves_clicks_on_another(tmp_path, redis_url):
    redis.Redis.from_url(redis_url).flushdb()
    checkpoint = tmp_path / "tiny_sam.pth"
    torch.save(tiny_sam(seed=3).state_dict(), checkpoint)
    script = tmp_path / "serve_tiny.py"
    script.write_text(SERVE.format(tests=str(TESTS)))
    files = {f"1/{n}.png": png_bytes(_image(240, 320, seed=s)) for n, s in [("one", 1), ("two", 2)]}
    procs, urls = [], []
    with serving(upload_server(files)) as media:
        try:
            for name in "ab":
                port = free_port()
                env = {k: v for k, v in os.environ.items() if not k.startswith(("SAM_", "YOLO_", "SEGMENTER"))}
                env.update(HOST="127.0.0.1", PORT=str(port), REDIS_URL=redis_url, LABEL_STUDIO_URL=media,
                           SEGMENTER="sam", SAM_CHECKPOINT=str(checkpoint), SAM_MODEL_TYPE="vit_b", DEVICE="cpu",
                           MEDIA_CACHE_DIR=str(tmp_path / name / "media"), REGISTRY_DIR=str(tmp_path / name / "reg"),
                           THREADS="4", WORKERS="1", PYTHONUNBUFFERED="1")
                with open(tmp_path / f"{name}.log", "wb") as log:
                    procs.append(subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=env, stdout=log,
                                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
                urls.append(f"http://127.0.0.1:{port}")

            def up(url, proc):
                assert proc.poll() is None, (tmp_path / "a.log").read_text() + (tmp_path / "b.log").read_text()
                try:
                    return requests.get(f"{url}/health", timeout=2).ok
                except requests.ConnectionError:
                    return False

            for url, proc in zip(urls, procs):
                _wait_until(lambda: up(url, proc), 120, "the servers to start")
            a, b = urls
            assert requests.get(f"{a}/health").json()["model_id"] == requests.get(f"{b}/health").json()["model_id"]

            # A computes the embedding and writes it to Redis ...
            first = _click(a, "one.png", 50, 40)
            _wait_until(lambda: _metrics(a).get("labelassist_shared_cache_writes_total") == 1.0, 30, "A's write")
            ma = _metrics(a)
            assert ma["labelassist_embedding_encoder_runs_total"] == 1.0
            assert ma["labelassist_shared_cache_misses_total"] == 1.0
            assert ma["labelassist_shared_cache_bytes"] > 0
            # ... B answers the same click from it, without running its encoder: the same mask.
            second = _click(b, "one.png", 50, 40)
            mb = _metrics(b)
            assert mb["labelassist_embedding_encoder_runs_total"] == 0.0
            assert mb["labelassist_shared_cache_hits_total"] == 1.0
            assert mb["labelassist_shared_cache_misses_total"] == 0.0
            assert second["value"]["rle"] == first["value"]["rle"]
            # B's next click on the image is served from its own memory (L1).
            _click(b, "one.png", 60, 50)
            mb = _metrics(b)
            assert mb["labelassist_embedding_cache_hits"] == 1.0 and mb["labelassist_shared_cache_hits_total"] == 1.0

            # First clicks on a new image on both replicas at once: one encoder run between them.
            out = {}
            threads = [threading.Thread(target=lambda u=u: out.__setitem__(u, _click(u, "two.png", 30, 60)))
                       for u in urls]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert len(out) == 2 and out[a]["value"]["rle"] == out[b]["value"]["rle"]
            runs = [_metrics(u)["labelassist_embedding_encoder_runs_total"] for u in urls]
            assert sum(runs) == 2.0, runs  # one for "one.png" on A, one for "two.png" on either

            # The other gauges: the served model version, jobs by state, queue depth.
            text = requests.get(f"{a}/metrics", timeout=10).text
            version = requests.get(f"{a}/health").json()["model_version"]
            assert f'labelassist_model_info{{model_version="{version}"}} 1.0' in text
            assert 'labelassist_jobs{state="queued"} 0.0' in text
            assert "labelassist_job_queue_depth 0.0" in text
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
