"""Real HTTP servers on loopback for tests: our app and a stand-in for Label Studio's media routes."""
from __future__ import annotations

import contextlib
import io
import logging
import threading

import numpy as np
from flask import Flask, abort, request
from PIL import Image
from werkzeug.serving import make_server


@contextlib.contextmanager
def serving(app, host: str = "127.0.0.1"):
    """Run a WSGI app on a free loopback port in a thread; yields its base URL."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access log per request
    server = make_server(host, 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(5)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def upload_server(files: dict[str, bytes], token: str | None = None) -> Flask:
    """Serves /data/upload/<name> like Label Studio does, optionally behind a legacy token."""
    app = Flask("fake-label-studio")
    app.config["hits"] = []

    @app.get("/data/upload/<path:name>")
    def upload(name):
        app.config["hits"].append(name)
        if token is not None and request.headers.get("Authorization") != f"Token {token}":
            abort(401)
        if name not in files:
            abort(404)
        return files[name], 200, {"Content-Type": "application/octet-stream"}

    return app


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def redis_server(tmp_dir):
    """A real redis-server (Debian's package; `make test` installs it) on a free loopback port,
    stopped afterwards. Yields its redis:// URL."""
    import shutil
    import subprocess
    import time

    import redis

    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed: `make test` installs Debian's redis-server package"
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.time() + 10
        while True:
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None and time.time() < deadline, "redis-server did not start"
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def worker_process(env: dict, log_path):
    """`labelassist worker` in its own process group (so a test can kill it and its work horse)."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    tests_dir = str(Path(__file__).parent)
    full_env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "labelassist.cli", "worker"], env=full_env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                kill_tree(proc.pid)
                proc.wait(5)


def descendants(pid: int) -> list[int]:
    """Child processes of `pid`, recursively (from /proc: RQ's work horse starts its own session)."""
    import os

    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def signal_tree(pid: int, sig: int) -> None:
    """Send `sig` to a process and all its descendants."""
    import os

    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once: a worker machine losing power."""
    import signal

    signal_tree(pid, signal.SIGKILL)
