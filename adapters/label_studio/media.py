"""Fetch task images the way Label Studio stores them, and decode them safely.

Supported image references (the value of a task's ``$image`` field):

* ``/data/upload/...`` and any other path relative to ``LABEL_STUDIO_URL``: fetched from Label
  Studio with its credentials;
* ``/data/local-files/?d=<path>``: read from ``LOCAL_FILES_DOCUMENT_ROOT`` when that is mounted,
  else fetched through Label Studio;
* ``http(s)://`` URLs: Label Studio's own origin gets credentials; any other host gets none and
  must be in ``ALLOWED_MEDIA_HOSTS``;
* cloud storage URIs (``s3://``, ``gs://``, ``azure-blob://`` ...): resolved through Label
  Studio's ``/tasks/<id>/presign/`` endpoint, whose redirect is followed without credentials;
* ``data:`` URIs with base64 payloads.

Downloads are streamed and bounded in size and time, and kept in a bounded on-disk cache. Error
messages and logs name URLs without their query strings (presigned URLs carry secrets) and never
carry credentials.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, quote, unquote_to_bytes, urljoin, urlsplit

import numpy as np
import requests
import urllib3
from pydantic import SecretStr

from ..errors import MediaError
from ..images import decode_image

logger = logging.getLogger(__name__)

_MAX_REDIRECTS = 5
_CHUNK = 64 * 1024
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _no_netrc(request):
    """A no-op requests auth: stops requests from adding ~/.netrc credentials on its own."""
    return request


def safe_url(url: str) -> str:
    """``url`` without query string, fragment or user info: safe to show in messages and logs."""
    if url[:5].lower() == "data:":
        return "data: URI"
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    scheme = f"{parts.scheme}://" if parts.scheme else ("//" if netloc else "")
    return f"{scheme}{netloc}{parts.path}"


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or _DEFAULT_PORTS.get(scheme)


def _jwt_exp(token: str) -> float | None:
    """The ``exp`` claim of a JWT, read without verifying the signature (we only need timing)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"])
    except (IndexError, KeyError, TypeError, ValueError, binascii.Error):
        return None


class LabelStudioAuth:
    """Authorization headers for Label Studio.

    A personal access token (a JWT refresh token) is exchanged at ``/api/token/refresh/`` for a
    short-lived access token that is sent as ``Bearer`` and cached until shortly before it expires.
    A legacy token (not JWT-shaped) is sent as ``Token <key>``. Thread-safe.
    """

    #: Refresh this many seconds before ``exp`` (at most half the remaining lifetime).
    margin_s = 30.0
    #: How long to use an access token whose ``exp`` cannot be read.
    fallback_ttl_s = 60.0

    def __init__(self, base_url: str, api_key: str | SecretStr, session: requests.Session | None = None,
                 timeout: float = 30.0, clock: Callable[[], float] = time.time):
        self.base_url = base_url.rstrip("/")
        self._key = api_key.get_secret_value() if isinstance(api_key, SecretStr) else str(api_key)
        self._key = self._key.strip()
        self.session = session or requests.Session()
        self.timeout = timeout
        self.clock = clock
        self._lock = threading.Lock()
        self._access: str | None = None
        self._valid_until = 0.0

    @property
    def is_pat(self) -> bool:
        """True for a personal access token (JWT-shaped: two dots), which needs refreshing."""
        return self._key.count(".") == 2

    def headers(self) -> dict[str, str]:
        """The ``Authorization`` header to send to Label Studio (refreshing the access token if due)."""
        if not self.is_pat:
            return {"Authorization": f"Token {self._key}"}
        with self._lock:
            if self._access is None or self.clock() >= self._valid_until:
                self._refresh()
            return {"Authorization": f"Bearer {self._access}"}

    def invalidate(self, used: dict[str, str] | None = None) -> None:
        """Forget the cached access token (only if it is still the one in ``used``, when given)."""
        with self._lock:
            if used is None or used.get("Authorization") == f"Bearer {self._access}":
                self._access = None

    def _refresh(self) -> None:
        url = f"{self.base_url}/api/token/refresh/"
        try:
            resp = self.session.post(url, json={"refresh": self._key}, timeout=self.timeout,
                                     allow_redirects=False, auth=_no_netrc)
        except requests.RequestException as exc:
            raise MediaError(422, f"could not refresh the Label Studio access token at {url}: "
                                  f"{type(exc).__name__}") from None
        with resp:
            if resp.status_code != 200:
                raise MediaError(422, f"Label Studio token refresh failed: HTTP {resp.status_code} from {url} "
                                      "(is LABEL_STUDIO_API_KEY a valid personal access token?)")
            try:
                access = resp.json()["access"]
            except (ValueError, KeyError, TypeError):
                access = None
        if not isinstance(access, str) or not access:
            raise MediaError(422, f"Label Studio token refresh at {url} returned no access token")
        now = self.clock()
        exp = _jwt_exp(access)
        if exp is None:
            self._valid_until = now + self.fallback_ttl_s
        else:
            self._valid_until = exp - min(self.margin_s, max(exp - now, 0.0) / 2)
        self._access = access
        logger.debug("refreshed the Label Studio access token")


class _DiskCache:
    """Files named by key under ``directory``; total size bounded, least recently used evicted."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        if self.max_bytes <= 0:
            return None
        path = self.directory / key
        try:
            data = path.read_bytes()
            os.utime(path)  # mark as recently used
        except OSError:
            return None
        return data

    def put(self, key: str, data: bytes) -> None:
        if self.max_bytes <= 0 or len(data) > self.max_bytes:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, self.directory / key)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            with self._lock:
                self._evict()
        except OSError as exc:
            logger.warning("media cache write failed in %s: %s", self.directory, exc)

    def _evict(self) -> None:
        entries = []
        for entry in os.scandir(self.directory):
            if entry.name.startswith(".tmp-") or not entry.is_file():
                continue
            try:
                st = entry.stat()
            except OSError:
                continue
            entries.append((st.st_mtime, entry.name, st.st_size))
        total = sum(size for _, _, size in entries)
        for _, name, size in sorted(entries):
            if total <= self.max_bytes:
                break
            try:
                os.unlink(self.directory / name)
            except OSError:
                continue
            total -= size


class MediaFetcher:
    """Fetches task images (see the module docstring for the supported references)."""

    def __init__(self, settings, session: requests.Session | None = None):
        self.settings = settings
        self.session = session or requests.Session()
        self.base_url = settings.label_studio_url.rstrip("/") if settings.label_studio_url else None
        key = settings.label_studio_api_key
        self.auth = (LabelStudioAuth(self.base_url, key, self.session, timeout=settings.media_timeout)
                     if self.base_url and key is not None and key.get_secret_value().strip() else None)
        self.cache = _DiskCache(settings.media_cache_dir, settings.media_cache_bytes)

    # --- public API ---

    def fetch(self, url: str, task_id: int | None = None) -> bytes:
        """The bytes of the image at ``url`` (``task_id`` is needed for cloud storage URIs)."""
        try:
            return self._fetch(url, task_id)
        except MediaError as exc:
            logger.warning("image fetch failed: %s", exc.message)
            raise

    def load_image(self, url: str, task_id: int | None = None) -> np.ndarray:
        """Fetch and decode the image at ``url``."""
        return decode_image(self.fetch(url, task_id), self.settings.max_image_pixels)

    # --- dispatch ---

    def _fetch(self, url: str, task_id: int | None) -> bytes:
        if not isinstance(url, str) or not url.strip():
            raise MediaError(400, "empty image URL")
        url = url.strip()
        if url[:5].lower() == "data:":
            return self._data_uri(url)
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if not scheme:
            if not url.startswith("/") or parts.netloc:
                raise MediaError(400, f"unsupported image URL {safe_url(url)!r}: expected an absolute URL "
                                      "or a path on Label Studio")
            if self._is_local_files(parts.path) and self.settings.local_files_document_root:
                return self._read_local(parts.query)
            full = self._ls_base(url) + url
            return self._cached(full, lambda: self._download(full, ls_auth=True, check_hosts=False))
        if scheme in ("http", "https"):
            if self._is_label_studio(url):
                if self._is_local_files(parts.path) and self.settings.local_files_document_root:
                    return self._read_local(parts.query)
                return self._cached(url, lambda: self._download(url, ls_auth=True, check_hosts=False))
            self._check_host(url)
            return self._cached(url, lambda: self._download(url, ls_auth=False, check_hosts=True))
        if parts.netloc and scheme != "file":
            return self._presign(url, task_id)
        raise MediaError(400, f"unsupported image URL scheme {scheme!r} in {safe_url(url)}")

    def _ls_base(self, url: str) -> str:
        if not self.base_url:
            raise MediaError(422, f"LABEL_STUDIO_URL must be set to fetch {safe_url(url)} from Label Studio")
        return self.base_url

    def _is_label_studio(self, url: str) -> bool:
        return self.base_url is not None and _origin(url) == _origin(self.base_url)

    @staticmethod
    def _is_local_files(path: str) -> bool:
        return path.rstrip("/").endswith("/data/local-files")

    def _check_host(self, url: str) -> None:
        allowed = self.settings.allowed_hosts()
        if allowed is None:
            return
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if host not in allowed and f"{host}:{parts.port}" not in allowed:
            raise MediaError(403, f"media host {host!r} is not in ALLOWED_MEDIA_HOSTS ({safe_url(url)})")

    # --- sources ---

    def _data_uri(self, url: str) -> bytes:
        header, sep, payload = url[5:].partition(",")
        if not sep:
            raise MediaError(400, "malformed data: URI")
        if len(payload) * 3 // 4 > self.settings.max_image_bytes:
            raise MediaError(413, f"data: URI image is larger than {self.settings.max_image_bytes} bytes")
        try:
            if header.lower().endswith(";base64"):
                data = base64.b64decode(unquote_to_bytes(payload), validate=False)
            else:
                data = unquote_to_bytes(payload)
        except (binascii.Error, ValueError):
            raise MediaError(422, "data: URI is not valid base64") from None
        if len(data) > self.settings.max_image_bytes:
            raise MediaError(413, f"data: URI image is larger than {self.settings.max_image_bytes} bytes")
        return data

    def _read_local(self, query: str) -> bytes:
        """Read ``?d=<path>`` from LOCAL_FILES_DOCUMENT_ROOT, refusing paths that escape it."""
        rel = parse_qs(query).get("d", [""])[0]
        if not rel:
            raise MediaError(400, "local-files URL without a ?d= path")
        root = Path(self.settings.local_files_document_root).resolve()
        candidate = Path(rel)
        path = (candidate if candidate.is_absolute() else root / candidate).resolve()
        if not path.is_relative_to(root):
            raise MediaError(403, f"local file {rel!r} is outside LOCAL_FILES_DOCUMENT_ROOT")
        try:
            size = path.stat().st_size
            if size > self.settings.max_image_bytes:
                raise MediaError(413, f"local file {rel!r} is larger than {self.settings.max_image_bytes} bytes")
            return path.read_bytes()
        except FileNotFoundError:
            raise MediaError(422, f"local file {rel!r} not found under LOCAL_FILES_DOCUMENT_ROOT") from None
        except OSError as exc:
            raise MediaError(422, f"could not read local file {rel!r}: {type(exc).__name__}") from None

    def _presign(self, uri: str, task_id: int | None) -> bytes:
        """Cloud storage URI: Label Studio answers ``/tasks/<id>/presign/`` with a redirect (or the data)."""
        if task_id is None:
            raise MediaError(422, f"a task id is needed to fetch the cloud storage URI {safe_url(uri)}")
        fileuri = base64.urlsafe_b64encode(uri.encode()).decode()  # what Label Studio decodes
        url = f"{self._ls_base(uri)}/tasks/{int(task_id)}/presign/?fileuri={quote(fileuri, safe='')}"
        return self._cached(f"{int(task_id)}|{uri}",
                            lambda: self._download(url, ls_auth=True, check_hosts=False, label=uri))

    def _cached(self, key_source: str, download: Callable[[], bytes]) -> bytes:
        key = hashlib.sha256(key_source.encode()).hexdigest()
        data = self.cache.get(key)
        if data is None:
            data = download()
            self.cache.put(key, data)
        return data

    # --- HTTP ---

    def _download(self, url: str, *, ls_auth: bool, check_hosts: bool, label: str | None = None) -> bytes:
        """GET ``url``, following redirects by hand: credentials go only to the first request."""
        label = safe_url(label or url)
        deadline = time.monotonic() + self.settings.media_timeout
        headers = self.auth.headers() if ls_auth and self.auth else {}
        for hops in range(_MAX_REDIRECTS + 1):
            where = label if hops == 0 else f"{safe_url(url)} (redirected from {label})"
            resp = self._get(url, headers, where)
            with resp:
                if resp.is_redirect:
                    url = urljoin(url, resp.headers["location"])
                    headers = {}  # never forward credentials to wherever a redirect points
                    if urlsplit(url).scheme.lower() not in ("http", "https"):
                        raise MediaError(422, f"redirect to an unsupported URL while fetching {label}")
                    if self._is_label_studio(url) and "/user/login" in urlsplit(url).path:
                        raise MediaError(422, f"Label Studio redirected to its login page while fetching {label}; "
                                              "check LABEL_STUDIO_API_KEY")
                    if check_hosts:
                        self._check_host(url)
                    continue
                if resp.status_code == 401 and headers and self.auth and self.auth.is_pat:
                    # The access token may have been revoked or expired early: refresh, retry once.
                    self.auth.invalidate(headers)
                    headers = self.auth.headers()
                    resp.close()
                    return self._retry_once(url, headers, where, deadline)
                return self._body(resp, where, deadline)
        raise MediaError(422, f"too many redirects fetching {label}")

    def _retry_once(self, url: str, headers: dict, where: str, deadline: float) -> bytes:
        resp = self._get(url, headers, where)
        with resp:
            if resp.is_redirect:
                # Rare (a retried request that now redirects): follow without credentials.
                return self._download(urljoin(url, resp.headers["location"]), ls_auth=False,
                                      check_hosts=False, label=where)
            return self._body(resp, where, deadline)

    def _get(self, url: str, headers: dict, where: str) -> requests.Response:
        timeout = self.settings.media_timeout
        try:
            return self.session.get(url, headers=headers, stream=True, allow_redirects=False,
                                    timeout=(timeout, timeout), auth=_no_netrc)
        except requests.RequestException as exc:
            raise _transport_error(exc, where) from None

    def _body(self, resp: requests.Response, where: str, deadline: float) -> bytes:
        status = resp.status_code
        if status >= 400 or status < 200:
            hint = ""
            if status in (401, 403) and self.auth is None and self._is_label_studio(resp.url or ""):
                hint = " (LABEL_STUDIO_API_KEY is not set)"
            raise MediaError(422, f"HTTP {status} fetching {where}{hint}")
        limit = self.settings.max_image_bytes
        declared = resp.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise MediaError(413, f"image at {where} is {declared} bytes, over the limit of {limit}")
        buf = bytearray()
        try:
            for chunk in resp.iter_content(_CHUNK):
                buf += chunk
                if len(buf) > limit:
                    raise MediaError(413, f"image at {where} is larger than the limit of {limit} bytes")
                if time.monotonic() > deadline:
                    raise MediaError(422, f"timed out fetching {where}")
        except requests.RequestException as exc:
            raise _transport_error(exc, where) from None
        return bytes(buf)


def _transport_error(exc: requests.RequestException, where: str) -> MediaError:
    """A MediaError for a network failure; never quotes ``exc`` (its text holds the full URL)."""
    timed_out = isinstance(exc, requests.Timeout) or any(
        isinstance(arg, urllib3.exceptions.TimeoutError) for arg in exc.args)
    if timed_out:
        return MediaError(422, f"timed out fetching {where}")
    if isinstance(exc, requests.ConnectionError):
        return MediaError(422, f"could not connect to fetch {where}")
    return MediaError(422, f"error fetching {where}: {type(exc).__name__}")
