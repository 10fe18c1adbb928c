"""Media fetching against real loopback HTTP servers: a fake Label Studio and a fake cloud bucket."""
from __future__ import annotations

import base64
import io
import os
import socket
import struct
import threading
import time
import zlib

import jwt
import numpy as np
import pytest
from flask import Flask, Response, abort, redirect, request
from PIL import Image
from werkzeug.serving import make_server

from labelassist.adapters.label_studio.media import (LabelStudioAuth, MediaError, MediaFetcher,
                                                     decode_image)
from labelassist.settings import Settings

SECRET = "fake-label-studio-signing-key-of-32-bytes+"
LEGACY = "0123456789abcdef0123456789abcdef01234567"
PRESIGN_SECRET = "X-Amz-Signature=topsecret"


def png_bytes(arr: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", **save)
    return buf.getvalue()


RGB = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
RGB_PNG = png_bytes(RGB)


def make_pat() -> str:
    return jwt.encode({"token_type": "refresh", "exp": int(time.time()) + 3600, "jti": "pat"}, SECRET,
                      algorithm="HS256")


PAT = make_pat()


class FakeLabelStudio:
    """Token refresh, uploads, local files and presign, like Label Studio 1.23 (much simplified)."""

    def __init__(self):
        self.access_ttl = 300
        self.reset()
        app = Flask("fake_ls")

        @app.post("/api/token/refresh/")
        def refresh():
            if (request.get_json(silent=True) or {}).get("refresh") != PAT:
                return {"detail": "Token is invalid"}, 401
            self.refreshes += 1
            token = jwt.encode({"token_type": "access", "exp": int(time.time()) + self.access_ttl,
                                "jti": str(self.refreshes)}, SECRET, algorithm="HS256")
            self.valid.add(token)
            return {"access": token}

        @app.get("/data/upload/<path:name>")
        def upload(name):
            self.check_auth()
            self.hits.append(request.full_path.rstrip("?"))
            if name == "slow.png":
                time.sleep(1.5)
            if name == "chunked.bin":
                return Response((b"x" * 1000 for _ in range(100)), mimetype="application/octet-stream")
            if name not in self.files:
                abort(404)
            return Response(self.files[name], mimetype="image/png")

        @app.get("/data/local-files/")
        def local_files():
            self.check_auth()
            self.hits.append(request.full_path.rstrip("?"))
            name = request.args.get("d", "")
            if name not in self.files:
                abort(404)
            return Response(self.files[name], mimetype="image/png")

        @app.get("/tasks/<int:task_id>/presign/")
        def presign(task_id):
            self.check_auth()
            uri = base64.urlsafe_b64decode(request.args["fileuri"].encode()).decode()
            self.presigned.append((task_id, uri))
            key = uri.split("://", 1)[1]
            return redirect(f"{self.cloud_url}/{key}?{PRESIGN_SECRET}", code=303)

        self.app = app

    def reset(self):
        self.refreshes = 0
        self.valid: set[str] = set()
        self.hits: list[str] = []
        self.presigned: list[tuple[int, str]] = []
        self.auth_seen: list[str | None] = []
        self.files = {"img.png": RGB_PNG, "text.png": b"hello, not an image", "big.png": b"\0" * 100_000}

    def check_auth(self):
        header = request.headers.get("Authorization")
        self.auth_seen.append(header)
        if header == f"Token {LEGACY}":
            return
        if header and header.startswith("Bearer "):
            token = header[7:]
            try:
                jwt.decode(token, SECRET, algorithms=["HS256"])
            except jwt.InvalidTokenError:
                abort(401)
            if token in self.valid:
                return
        abort(401)


class FakeCloud:
    """A bucket that serves anything and records the headers it received."""

    def __init__(self):
        self.reset()
        app = Flask("fake_cloud")

        @app.get("/<path:key>")
        def get(key):
            self.requests.append((request.full_path, dict(request.headers)))
            if key == "hop":
                return redirect(request.args["to"], code=302)
            if key.endswith("missing.png"):
                abort(404)
            return Response(RGB_PNG, mimetype="image/png")

        self.app = app

    def reset(self):
        self.requests: list[tuple[str, dict]] = []


@pytest.fixture(scope="module")
def servers():
    ls, cloud = FakeLabelStudio(), FakeCloud()
    # A different loopback address for the "cloud" (a different host, as with real presigned URLs);
    # Linux routes all of 127.0.0.0/8 to the loopback interface.
    cloud_host = "127.0.0.2"
    started = []
    for app, host in ((ls.app, "127.0.0.1"), (cloud.app, cloud_host)):
        srv = make_server(host, 0, app, threaded=True)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        started.append(srv)
    ls.url = f"http://127.0.0.1:{started[0].server_port}"
    cloud.url = ls.cloud_url = f"http://{cloud_host}:{started[1].server_port}"
    cloud.host = cloud_host
    yield ls, cloud
    for srv in started:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def ls(servers):
    servers[0].reset()
    servers[1].reset()
    return servers[0]


@pytest.fixture
def cloud(servers):
    return servers[1]


def fetcher(ls, tmp_path, key=PAT, **kw) -> MediaFetcher:
    kw.setdefault("media_cache_dir", tmp_path / "cache")
    kw.setdefault("media_timeout", 5.0)
    return MediaFetcher(Settings(label_studio_url=ls.url, label_studio_api_key=key, **kw))


def bearer_count(ls) -> int:
    return sum(1 for h in ls.auth_seen if h and h.startswith("Bearer "))


# --- Label Studio auth ---


def test_pat_refreshed_then_bearer_used_and_cached(ls, tmp_path):
    f = fetcher(ls, tmp_path, media_cache_bytes=0)
    for _ in range(3):
        assert f.fetch("/data/upload/img.png") == RGB_PNG
    assert ls.refreshes == 1
    assert bearer_count(ls) == 3
    assert np.array_equal(f.load_image("/data/upload/img.png"), RGB)


def test_expired_access_token_is_refreshed(ls, tmp_path):
    f = fetcher(ls, tmp_path, media_cache_bytes=0)
    now = [time.time()]
    f.auth.clock = lambda: now[0]
    f.fetch("/data/upload/img.png")
    now[0] += 200  # still well before exp - margin
    f.fetch("/data/upload/img.png")
    assert ls.refreshes == 1
    now[0] += 90  # within 30 s of exp
    f.fetch("/data/upload/img.png")
    assert ls.refreshes == 2


def test_401_refreshes_once_and_retries(ls, tmp_path):
    f = fetcher(ls, tmp_path, media_cache_bytes=0)
    f.fetch("/data/upload/img.png")
    ls.valid.clear()  # server revokes every access token
    assert f.fetch("/data/upload/img.png") == RGB_PNG
    assert ls.refreshes == 2


def test_legacy_token(ls, tmp_path):
    f = fetcher(ls, tmp_path, key=LEGACY)
    assert f.fetch("/data/upload/img.png") == RGB_PNG
    assert ls.refreshes == 0
    assert ls.auth_seen == [f"Token {LEGACY}"]


def test_auth_headers_thread_safe_single_refresh(ls):
    auth = LabelStudioAuth(ls.url, PAT)
    results = []
    threads = [threading.Thread(target=lambda: results.append(auth.headers())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ls.refreshes == 1 and len({r["Authorization"] for r in results}) == 1


def test_bad_pat_fails_with_422_without_leaking_it(ls, tmp_path):
    bad = make_pat()[:-4] + "AAAA"
    f = fetcher(ls, tmp_path, key=bad)
    with pytest.raises(MediaError) as err:
        f.fetch("/data/upload/img.png")
    assert err.value.status == 422 and "401" in err.value.message and bad not in err.value.message


def test_wrong_legacy_token_gives_401_message(ls, tmp_path, caplog):
    f = fetcher(ls, tmp_path, key="wrong-legacy-token")
    with pytest.raises(MediaError) as err:
        f.fetch("/data/upload/img.png?secret=abc")
    assert err.value.status == 422 and "HTTP 401" in err.value.message
    assert "secret" not in err.value.message
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("labelassist"))
    assert "HTTP 401" in ours
    assert "wrong-legacy-token" not in ours and "secret=abc" not in ours


def test_upload_404(ls, tmp_path):
    with pytest.raises(MediaError) as err:
        fetcher(ls, tmp_path).fetch("/data/upload/nope.png")
    assert err.value.status == 422 and "404" in err.value.message and "/data/upload/nope.png" in err.value.message


def test_relative_path_needs_label_studio_url(tmp_path):
    f = MediaFetcher(Settings(label_studio_url=None, media_cache_dir=tmp_path))
    with pytest.raises(MediaError) as err:
        f.fetch("/data/upload/img.png")
    assert err.value.status == 422 and "LABEL_STUDIO_URL" in err.value.message


def test_absolute_label_studio_url_gets_auth(ls, tmp_path):
    assert fetcher(ls, tmp_path).fetch(f"{ls.url}/data/upload/img.png") == RGB_PNG
    assert bearer_count(ls) == 1


# --- sizes, timeouts, decoding failures ---


def test_not_an_image(ls, tmp_path):
    with pytest.raises(MediaError) as err:
        fetcher(ls, tmp_path).load_image("/data/upload/text.png")
    assert err.value.status == 422 and "not an image" in err.value.message


def test_over_max_bytes_with_and_without_content_length(ls, tmp_path):
    f = fetcher(ls, tmp_path, max_image_bytes=50_000)
    for name in ("big.png", "chunked.bin"):
        with pytest.raises(MediaError) as err:
            f.fetch(f"/data/upload/{name}")
        assert err.value.status == 413


def test_timeout(ls, tmp_path):
    with pytest.raises(MediaError) as err:
        fetcher(ls, tmp_path, media_timeout=0.3).fetch("/data/upload/slow.png")
    assert err.value.status == 422 and "timed out" in err.value.message


# --- local files ---


def test_local_files_from_document_root(ls, tmp_path):
    root = tmp_path / "root"
    (root / "dir").mkdir(parents=True)
    (root / "dir" / "a.png").write_bytes(RGB_PNG)
    (tmp_path / "secret.png").write_bytes(b"secret")
    f = fetcher(ls, tmp_path, local_files_document_root=root)
    assert f.fetch("/data/local-files/?d=dir/a.png") == RGB_PNG
    assert f.fetch("/data/local-files/?d=dir%2Fa.png") == RGB_PNG
    assert ls.hits == []  # read from disk, not through Label Studio
    for bad in ("../secret.png", "dir/../../secret.png", str(tmp_path / "secret.png")):
        with pytest.raises(MediaError) as err:
            f.fetch(f"/data/local-files/?d={bad}")
        assert err.value.status == 403
    with pytest.raises(MediaError) as err:
        f.fetch("/data/local-files/?d=dir/missing.png")
    assert err.value.status == 422 and "not found" in err.value.message


def test_local_files_through_label_studio_without_root(ls, tmp_path):
    assert fetcher(ls, tmp_path).fetch("/data/local-files/?d=img.png") == RGB_PNG
    assert ls.hits == ["/data/local-files/?d=img.png"] and bearer_count(ls) == 1


# --- other hosts and cloud storage ---


def test_no_credentials_to_other_hosts(ls, cloud, tmp_path):
    f = fetcher(ls, tmp_path)
    assert f.fetch(f"{cloud.url}/pics/a.png") == RGB_PNG
    ((_, headers),) = cloud.requests
    assert "Authorization" not in headers and ls.refreshes == 0


def test_disallowed_host_rejected_without_contact(ls, cloud, tmp_path):
    f = fetcher(ls, tmp_path, allowed_media_hosts="images.example.com")
    with pytest.raises(MediaError) as err:
        f.fetch(f"{cloud.url}/pics/a.png?token=abc")
    assert err.value.status == 403 and cloud.host in err.value.message and "token" not in err.value.message
    assert cloud.requests == []


def test_redirect_to_disallowed_host_rejected(ls, cloud, tmp_path):
    f = fetcher(ls, tmp_path, allowed_media_hosts=cloud.host)
    with pytest.raises(MediaError) as err:
        f.fetch(f"{cloud.url}/hop?to={ls.url}/data/upload/img.png")
    assert err.value.status == 403 and ls.hits == []


def test_cloud_uri_via_presign_without_forwarding_auth(ls, cloud, tmp_path):
    f = fetcher(ls, tmp_path)
    uri = "s3://bucket/dir/a b+é.png"
    assert f.fetch(uri, task_id=7) == RGB_PNG
    assert ls.presigned == [(7, uri)]
    assert bearer_count(ls) == 1  # the presign request carried the token ...
    ((path, headers),) = cloud.requests
    assert PRESIGN_SECRET in path
    assert "Authorization" not in headers  # ... the redirected one did not


def test_cloud_uri_errors(ls, cloud, tmp_path):
    f = fetcher(ls, tmp_path)
    with pytest.raises(MediaError) as err:
        f.fetch("gs://bucket/a.png")
    assert err.value.status == 422 and "task" in err.value.message
    with pytest.raises(MediaError) as err:
        f.fetch("azure-blob://container/missing.png", task_id=3)
    msg = err.value.message
    assert err.value.status == 422 and "404" in msg and "topsecret" not in msg
    assert "azure-blob://container/missing.png" in msg


def test_unsupported_schemes(ls, tmp_path):
    f = fetcher(ls, tmp_path)
    for url in ("file:///etc/passwd", "ftp:/x", "images/a.png", "//evil.example/a.png"):
        with pytest.raises(MediaError) as err:
            f.fetch(url)
        assert err.value.status == 400


def test_data_uri(ls, tmp_path):
    uri = "data:image/png;base64," + base64.b64encode(RGB_PNG).decode()
    assert np.array_equal(fetcher(ls, tmp_path).load_image(uri), RGB)


# --- disk cache ---


def test_disk_cache_hit(ls, tmp_path):
    f = fetcher(ls, tmp_path)
    assert f.fetch("/data/upload/img.png") == RGB_PNG
    assert f.fetch("/data/upload/img.png") == RGB_PNG
    assert len(ls.hits) == 1
    assert fetcher(ls, tmp_path).fetch("/data/upload/img.png") == RGB_PNG  # survives a restart
    assert len(ls.hits) == 1


def test_errors_not_cached(ls, tmp_path):
    f = fetcher(ls, tmp_path)
    with pytest.raises(MediaError):
        f.fetch("/data/upload/later.png")
    ls.files["later.png"] = RGB_PNG
    assert f.fetch("/data/upload/later.png") == RGB_PNG


def test_disk_cache_size_bound_evicts_least_recently_used(ls, tmp_path):
    for i in range(4):
        ls.files[f"f{i}.png"] = bytes([i]) * 1000
    cache_dir = tmp_path / "cache"
    f = fetcher(ls, tmp_path, media_cache_bytes=2500)
    f.fetch("/data/upload/f0.png")
    f.fetch("/data/upload/f1.png")
    old = time.time() - 100
    for i, entry in enumerate(sorted(cache_dir.iterdir(), key=lambda p: p.stat().st_mtime)):
        os.utime(entry, (old + i, old + i))
    f.fetch("/data/upload/f0.png")  # hit: f0 becomes most recently used
    f.fetch("/data/upload/f2.png")  # 3000 bytes > 2500: evicts f1
    assert sum(p.stat().st_size for p in cache_dir.iterdir()) <= 2500
    ls.hits.clear()
    f.fetch("/data/upload/f0.png")
    f.fetch("/data/upload/f2.png")
    assert ls.hits == []
    f.fetch("/data/upload/f1.png")
    assert ls.hits == ["/data/upload/f1.png"]
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".tmp-")]


# --- decoding ---


def _patch_png_size(data: bytes, width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height (the pixel data stays tiny): a cheap 'bomb'."""
    ihdr = bytearray(data[8:33])  # length, type, 13 bytes of data, crc
    ihdr[8:16] = struct.pack(">II", width, height)
    ihdr[21:25] = struct.pack(">I", zlib.crc32(bytes(ihdr[4:21])))
    return data[:8] + bytes(ihdr) + data[33:]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixel_limit_checked_before_decoding(ls, tmp_path):
    small = png_bytes(np.zeros((200, 200), np.uint8))
    with pytest.raises(MediaError) as err:
        decode_image(small, max_pixels=10_000)
    assert err.value.status == 413 and "200 x 200" in err.value.message
    # Declares 10000 x 10000 (above PIL's warning threshold, below its error): our check fires.
    with pytest.raises(MediaError) as err:
        decode_image(_patch_png_size(small, 10_000, 10_000), max_pixels=50_000_000)
    assert err.value.status == 413 and "10000 x 10000" in err.value.message
    # Declares 20000 x 20000 (PIL's own bomb error fires while opening): still a 413.
    bomb = _patch_png_size(small, 20_000, 20_000)
    assert len(bomb) < 2000
    with pytest.raises(MediaError) as err:
        decode_image(bomb, max_pixels=10**12)
    assert err.value.status == 413
    # Through the fetcher, with the limit from settings.
    ls.files["bomb.png"] = bomb
    with pytest.raises(MediaError) as err:
        fetcher(ls, tmp_path).load_image("/data/upload/bomb.png")
    assert err.value.status == 413


def test_16_bit_gray_decodes_to_uint16():
    arr = np.array([[0, 1000, 2], [40000, 65535, 7]], dtype=np.uint16)
    out = decode_image(png_bytes(arr), 10**6)
    assert out.dtype == np.uint16 and np.array_equal(out, arr)
    big_endian = Image.frombytes("I;16B", (3, 2), arr.astype(">u2").tobytes())
    buf = io.BytesIO()
    big_endian.save(buf, "TIFF")
    out = decode_image(buf.getvalue(), 10**6)
    assert out.dtype == np.uint16 and np.array_equal(out, arr)


def test_32_bit_int_kept_when_out_of_uint16_range():
    arr = np.array([[0, 70000], [5, -3]], dtype=np.int32)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "TIFF")
    out = decode_image(buf.getvalue(), 10**6)
    assert out.dtype == np.int32 and np.array_equal(out, arr)


def test_gray_and_palette_and_rgba():
    gray = np.array([[0, 128, 255]], np.uint8)
    out = decode_image(png_bytes(gray), 10**6)
    assert out.shape == (1, 3) and out.dtype == np.uint8 and np.array_equal(out, gray)
    pal = Image.fromarray(RGB).convert("P")
    buf = io.BytesIO()
    pal.save(buf, "PNG")
    assert decode_image(buf.getvalue(), 10**6).shape == (4, 6, 3)
    rgba = np.dstack([RGB, np.full((4, 6), 9, np.uint8)])
    out = decode_image(png_bytes(rgba), 10**6)
    assert out.shape == (4, 6, 3) and np.array_equal(out, RGB)


def test_exif_orientation_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = decode_image(png_bytes(RGB, exif=exif), 10**6)
    assert out.shape == (6, 4, 3)
    assert np.array_equal(out, np.rot90(RGB, k=-1))
