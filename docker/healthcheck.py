"""The image's HEALTHCHECK, for every ROLE.

all, interactive, prelabel: GET http://127.0.0.1:PORT/health answers 200.
worker: Redis (REDIS_URL) answers, and an RQ worker started on this host is registered there.
Exit 0 when healthy, 1 (with one line saying why) when not.
"""
from __future__ import annotations

import socket
import sys
import urllib.request

from labelassist.settings import get_settings


def check() -> str | None:
    """None when healthy, else why not."""
    settings = get_settings()
    if settings.role == "worker":
        if settings.redis_url is None:
            return "ROLE=worker needs REDIS_URL"
        from redis import Redis
        from rq import Worker

        connection = Redis.from_url(settings.redis_url.get_secret_value(), socket_timeout=5,
                                    socket_connect_timeout=5)
        host = socket.gethostname()
        if not any(w.hostname == host for w in Worker.all(connection=connection)):
            return f"no RQ worker from {host} is registered in Redis"
        return None
    with urllib.request.urlopen(f"http://127.0.0.1:{settings.port}/health", timeout=5) as resp:  # noqa: S310
        return None if resp.status == 200 else f"/health answered {resp.status}"


def main() -> int:
    try:
        problem = check()
    except Exception as exc:  # refused, timed out, Redis down: unhealthy, not a traceback
        problem = f"{type(exc).__name__}: {exc}"
    if problem:
        print(f"unhealthy: {problem}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
