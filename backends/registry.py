"""Versioned model store on disk (a local folder or a shared volume).

Layout under `root`:

    root/versions/<version_id>/weights.pt
    root/versions/<version_id>/weights.calibration.json   (optional; the name serving looks for,
                                                           see backends.uncertainty.calibration_path)
    root/versions/<version_id>/meta.json                   (version_id, created, parent, metrics,
                                                           sha256, size, status, info)
    root/current                                           the pointer: JSON {"current": id,
                                                           "history": [promoted ids, oldest first]}
    root/tmp/                                              publishes in progress (and crash leftovers)
    root/.lock                                             flock'd around publish/promote/rollback

Guarantees:

- `publish` copies the weights into a temporary folder inside root, fsyncs, checks the copy's sha256
  against the source and runs a `validate` callable on the copy (e.g. YoloDetector.from_weights; the
  registry itself knows nothing of ultralytics), then renames the folder into `versions/` in one
  os.replace. A version folder is therefore either complete or absent. Publishing does not promote.
- The pointer is a small file replaced atomically (write a temp file, fsync, os.replace): never a
  symlink, so it works on any volume. Readers take no lock.
- `current()` never serves a version whose folder is missing, whose meta is unreadable or whose
  weights no longer match their sha256 (checked on every call, cached by the file's stat signature):
  it falls back to the newest earlier promoted version that is still valid, and logs it.
- Leftover temporary folders (a crash mid-publish) are never listed and are removed by a later
  publish once older than `stale_tmp_s`.

Version ids are "v0001", "v0002", ...: assigned under the lock, so concurrent publishes (threads or
processes sharing the volume, where flock works) get distinct, ordered ids.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

WEIGHTS_NAME = "weights.pt"
CALIBRATION_NAME = "weights.calibration.json"
META_NAME = "meta.json"
POINTER_NAME = "current"
_ID_RE = re.compile(r"^v(\d{4,})$")


class RegistryError(Exception):
    """A registry operation failed (unknown version, corrupt file, failed validation)."""


@dataclass(frozen=True)
class Version:
    version_id: str
    path: Path
    meta: dict[str, Any] = field(compare=False)

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS_NAME

    @property
    def calibration(self) -> Path | None:
        p = self.path / CALIBRATION_NAME
        return p if p.is_file() else None

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(self.meta.get("metrics") or {})

    @property
    def parent(self) -> str | None:
        return self.meta.get("parent")

    @property
    def created(self) -> float:
        return float(self.meta.get("created", 0.0))

    @property
    def sha256(self) -> str:
        return str(self.meta.get("sha256", ""))

    @property
    def status(self) -> str:
        return str(self.meta.get("status", "published"))

    def calibration_dict(self) -> dict[str, Any] | None:
        p = self.calibration
        return None if p is None else json.loads(p.read_text())


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _atomic_write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        _write_file(tmp, json.dumps(obj, indent=2, sort_keys=True).encode())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


class ModelRegistry:
    """A versioned store of model weights; see the module docstring."""

    def __init__(self, root: str | Path, stale_tmp_s: float = 3600.0):
        self.root = Path(root).expanduser().resolve()
        self.versions_dir = self.root / "versions"
        self.tmp_dir = self.root / "tmp"
        self.pointer = self.root / POINTER_NAME
        self.stale_tmp_s = float(stale_tmp_s)
        for d in (self.versions_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._thread_lock = threading.Lock()  # flock is per open file; this orders threads too
        # (path, size, mtime_ns, inode, expected sha) -> bool, so current() hashes only changed files
        self._verified: dict[tuple, bool] = {}
        self._verified_lock = threading.Lock()

    # --- locking --------------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            with open(self.root / ".lock", "a+b") as f:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    # --- reading --------------------------------------------------------------------------------

    def _load(self, version_id: str) -> Version | None:
        """The version if its folder and meta are readable (weights not hashed here)."""
        if not _ID_RE.match(version_id or ""):
            return None
        path = self.versions_dir / version_id
        try:
            meta = json.loads((path / META_NAME).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or meta.get("version_id") != version_id:
            return None
        return Version(version_id, path, meta)

    def get(self, version_id: str) -> Version:
        """A published version (whether or not its weights are still intact: see `is_valid`)."""
        v = self._load(version_id)
        if v is None:
            raise RegistryError(f"unknown model version {version_id!r}")
        return v

    def versions(self) -> list[Version]:
        """Every published version, oldest first. Temp folders and broken entries are skipped."""
        out = []
        for p in self.versions_dir.iterdir() if self.versions_dir.is_dir() else ():
            v = self._load(p.name)
            if v is not None:
                out.append(v)
        return sorted(out, key=lambda v: int(v.version_id[1:]))

    def is_valid(self, version: Version | str) -> bool:
        """Whether the version's weights exist and match the sha256 recorded at publish."""
        v = self._load(version) if isinstance(version, str) else version
        if v is None:
            return False
        try:
            st = v.weights.stat()
        except OSError:
            return False
        key = (str(v.weights), st.st_size, st.st_mtime_ns, st.st_ino, v.sha256)
        with self._verified_lock:
            if key in self._verified:
                return self._verified[key]
        ok = st.st_size == v.meta.get("size", st.st_size) and sha256_file(v.weights) == v.sha256
        with self._verified_lock:
            self._verified[key] = ok
        return ok

    def _read_pointer(self) -> dict[str, Any]:
        try:
            data = json.loads(self.pointer.read_text())
        except FileNotFoundError:
            return {"current": None, "history": []}
        except (OSError, ValueError):
            log.error("model registry pointer %s is unreadable; serving no version", self.pointer)
            return {"current": None, "history": []}
        hist = [h for h in data.get("history") or [] if isinstance(h, str)]
        return {"current": data.get("current"), "history": hist}

    def pointed(self) -> str | None:
        """The version id the pointer names (which `current()` serves only if it is valid)."""
        return self._read_pointer()["current"]

    def history(self) -> list[str]:
        """Promoted versions, oldest first; the last is the pointed one."""
        return list(self._read_pointer()["history"])

    def current(self) -> Version | None:
        """The version to serve: the pointed one if valid, else the newest earlier promoted valid one
        (logged), else None."""
        ptr = self._read_pointer()
        cur = ptr["current"]
        if cur is None:
            return None
        v = self._load(cur)
        if v is not None and self.is_valid(v):
            return v
        for vid in reversed(ptr["history"]):
            if vid == cur:
                continue
            cand = self._load(vid)
            if cand is not None and self.is_valid(cand):
                log.error("model version %s is missing or corrupt; serving earlier version %s", cur, vid)
                return cand
        log.error("model version %s is missing or corrupt and no earlier valid version exists", cur)
        return None

    # --- writing --------------------------------------------------------------------------------

    def _next_id(self) -> str:
        nums = [int(m.group(1)) for p in self.versions_dir.iterdir() if (m := _ID_RE.match(p.name))]
        return f"v{max(nums, default=0) + 1:04d}"

    def publish(self, weights_path: str | Path, metrics: dict[str, Any] | None = None,
                calibration: dict[str, Any] | None = None, parent: str | None = None,
                validate: Callable[[Path], Any] | None = None, info: dict[str, Any] | None = None) -> str:
        """Store a copy of `weights_path` as a new version and return its id; does not promote it.

        `validate(path)` is called on the stored copy and must raise if the weights are unusable
        (e.g. YoloDetector.from_weights). On any failure nothing is published (RegistryError, or the
        validator's exception chained) and the pointer is untouched.
        """
        src = Path(weights_path)
        if not src.is_file():
            raise RegistryError(f"weights not found: {src}")
        if parent is not None and self._load(parent) is None:
            raise RegistryError(f"unknown parent version {parent!r}")
        json.dumps(metrics or {})  # fail early on metrics that cannot be stored
        expected = sha256_file(src)
        tmp = self.tmp_dir / f"publish-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            dst = tmp / WEIGHTS_NAME
            with open(src, "rb") as fi, open(dst, "wb") as fo:
                shutil.copyfileobj(fi, fo, 1 << 20)
                fo.flush()
                os.fsync(fo.fileno())
            got = sha256_file(dst)
            if got != expected:
                raise RegistryError(f"copy of {src} does not match its sha256 (changed while copying?)")
            if calibration is not None:
                _write_file(tmp / CALIBRATION_NAME, json.dumps(calibration, indent=2).encode())
            if validate is not None:
                try:
                    validate(dst)
                except Exception as exc:
                    raise RegistryError(f"weights {src.name} failed validation: "
                                        f"{type(exc).__name__}: {exc}") from exc
            meta = {"parent": parent, "metrics": metrics or {}, "sha256": got, "size": dst.stat().st_size,
                    "status": "published", "source": src.name, "info": info or {}}
            with self._locked():
                self._clean_tmp_safe(tmp)
                vid = self._next_id()
                meta.update(version_id=vid, created=time.time())
                _write_file(tmp / META_NAME, json.dumps(meta, indent=2, sort_keys=True).encode())
                _fsync_dir(tmp)
                os.replace(tmp, self.versions_dir / vid)
                _fsync_dir(self.versions_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("published model version %s (sha256 %s, parent %s)", vid, got[:12], parent)
        return vid

    def _clean_tmp_safe(self, keep: Path) -> None:
        try:
            for p in self.tmp_dir.iterdir():
                if p != keep and time.time() - p.stat().st_mtime > self.stale_tmp_s:
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
        except OSError:
            pass

    def _set_meta_status(self, v: Version, status: str) -> None:
        meta = dict(v.meta, status=status, status_changed=time.time())
        _atomic_write_json(v.path / META_NAME, meta)

    def promote(self, version_id: str) -> Version:
        """Make a published, intact version current (atomic pointer swap)."""
        with self._locked():
            v = self._load(version_id)
            if v is None:
                raise RegistryError(f"unknown model version {version_id!r}")
            if not self.is_valid(v):
                raise RegistryError(f"model version {version_id} is corrupt (sha256 mismatch); not promoted")
            ptr = self._read_pointer()
            hist = [h for h in ptr["history"] if h != version_id] + [version_id]
            _atomic_write_json(self.pointer, {"current": version_id, "history": hist, "updated": time.time()})
            self._set_meta_status(v, "promoted")
        log.info("promoted model version %s (previous %s)", version_id, ptr["current"])
        return self.get(version_id)

    def rollback(self, version_id: str | None = None) -> Version:
        """Point back to `version_id` (any intact published version), or by default to the newest
        intact version promoted before the current one. Versions rolled back over are marked
        "rolled_back" and dropped from the history, so repeated rollbacks walk further back."""
        with self._locked():
            ptr = self._read_pointer()
            cur, hist = ptr["current"], ptr["history"]
            if version_id is None:
                earlier = [h for h in hist if h != cur]
                target = next((h for h in reversed(earlier) if self.is_valid(h)), None)
                if target is None:
                    raise RegistryError("no earlier valid version to roll back to")
            else:
                if self._load(version_id) is None:
                    raise RegistryError(f"unknown model version {version_id!r}")
                if not self.is_valid(version_id):
                    raise RegistryError(f"model version {version_id} is corrupt; cannot roll back to it")
                target = version_id
            if target in hist:
                dropped = hist[hist.index(target) + 1:]
                new_hist = hist[:hist.index(target) + 1]
            else:
                dropped = [cur] if cur else []
                new_hist = [h for h in hist if h != cur] + [target]
            _atomic_write_json(self.pointer, {"current": target, "history": new_hist, "updated": time.time()})
            for d in dropped:
                dv = self._load(d)
                if dv is not None and d != target:
                    self._set_meta_status(dv, "rolled_back")
            tv = self._load(target)
            if tv is not None:
                self._set_meta_status(tv, "promoted")
        log.warning("rolled back model from %s to %s", cur, target)
        return self.get(target)
