"""Label Studio's API through label-studio-sdk (which refreshes personal access tokens itself), for the
jobs that pull from or push to a project: training and bulk pre-labels."""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

from ...jobs import JobFailed
from ...settings import Settings

log = logging.getLogger(__name__)


def label_studio_client(settings: Settings, purpose: str):
    from label_studio_sdk.client import LabelStudio

    if not settings.label_studio_url or settings.label_studio_api_key is None:
        raise JobFailed(f"{purpose} needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
    return LabelStudio(base_url=settings.label_studio_url,
                       api_key=settings.label_studio_api_key.get_secret_value(), timeout=settings.media_timeout)


def with_retries(what: str, fn: Callable[[], Any], attempts: int, backoff: float) -> Any:
    """Call `fn`, retrying connection failures with exponential backoff; then fail the job clearly."""
    import httpx
    import requests

    transient = (httpx.TransportError, requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except transient as exc:
            if attempt == attempts:
                raise JobFailed(f"{what}: Label Studio unreachable after {attempts} attempts "
                                f"({type(exc).__name__})") from None
            delay = backoff * 2 ** (attempt - 1)
            log.warning("%s failed (attempt %d of %d, %s); retrying in %.1f s", what, attempt, attempts,
                        type(exc).__name__, delay)
            time.sleep(delay)
