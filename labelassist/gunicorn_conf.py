"""gunicorn settings for the Label Studio backend, read from labelassist's Settings.

One file for every way the backend is started: `labelassist serve` (and so `labelassist start` and
the container image) applies these, and plain gunicorn takes the same module:

    gunicorn -c python:labelassist.gunicorn_conf "labelassist.adapters.label_studio.app:create_app()"

Models are loaded in each worker after the fork, never in the master: no `preload_app`. A CUDA
context made before a fork is unusable in the forked workers, and each worker holds its own models.
"""
from __future__ import annotations

from labelassist.settings import Settings, get_settings


def options(settings: Settings | None = None) -> dict:
    """The gunicorn settings, by gunicorn's names, from HOST, PORT, WORKERS, THREADS and LOG_LEVEL."""
    s = settings or get_settings()
    return {
        "bind": f"{s.host}:{s.port}",
        "workers": s.workers,
        "threads": s.threads,
        "worker_class": "gthread",
        # Label Studio waits up to 100 s for a predict; an image encode on CPU must fit.
        "timeout": 120,
        "loglevel": s.log_level.lower(),
        "accesslog": "-",
        "preload_app": False,
    }


# What `gunicorn -c python:labelassist.gunicorn_conf` reads: module-level names.
_options = options()
bind = _options["bind"]
workers = _options["workers"]
threads = _options["threads"]
worker_class = _options["worker_class"]
timeout = _options["timeout"]
loglevel = _options["loglevel"]
accesslog = _options["accesslog"]
preload_app = _options["preload_app"]
