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
