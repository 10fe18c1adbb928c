"""The versioned model store: atomic publish, pointer, corrupt versions never served, rollback."""
from __future__ import annotations

import json
import os
import threading
import time

import pytest

from labelassist.backends.registry import ModelRegistry, RegistryError, sha256_file


def _weights(tmp_path, name: str, payload: bytes | None = None):
    p = tmp_path / f"{name}.pt"
    p.write_bytes(payload if payload is not None else (b"MODEL:" + name.encode()) * 1000)
    return p


def _check(path):
    """A stand-in validator: accepts files that start with the right magic."""
    if not path.read_bytes().startswith(b"MODEL:"):
        raise ValueError("not a model")


def test_publish_promote_current_rollback(tmp_path):
    reg = ModelRegistry(tmp_path / "reg")
    assert reg.current() is None and reg.versions() == []
    w1 = _weights(tmp_path, "a")
    v1 = reg.publish(w1, {"map50": 0.5}, calibration={"kind": "identity"}, validate=_check)
    assert reg.current() is None  # publishing does not promote
    v = reg.get(v1)
    assert v.weights.read_bytes() == w1.read_bytes()
    assert v.sha256 == sha256_file(w1) and v.metrics == {"map50": 0.5} and v.parent is None
    assert v.calibration_dict() == {"kind": "identity"} and v.status == "published"
    assert v.weights.name == "weights.pt" and (v.path / "meta.json").is_file()

    reg.promote(v1)
    assert reg.current().version_id == v1 and reg.get(v1).status == "promoted"
    v2 = reg.publish(_weights(tmp_path, "b"), {"map50": 0.6}, parent=v1)
    assert reg.get(v2).parent == v1 and reg.get(v2).calibration is None
    v3 = reg.publish(_weights(tmp_path, "c"), {"map50": 0.7}, parent=v2)
    assert [x.version_id for x in reg.versions()] == [v1, v2, v3]
    assert len({v1, v2, v3}) == 3
    reg.promote(v2)
    reg.promote(v3)
    assert reg.current().version_id == v3
    assert reg.history() == [v1, v2, v3]
    # The pointer is a plain file (not a symlink) holding JSON.
    assert not os.path.islink(reg.pointer) and json.loads(reg.pointer.read_text())["current"] == v3

    assert reg.rollback().version_id == v2  # previous current
    assert reg.current().version_id == v2 and reg.get(v3).status == "rolled_back"
    assert reg.rollback().version_id == v1  # repeated rollbacks walk further back
    with pytest.raises(RegistryError):
        reg.rollback()  # nothing earlier
    assert reg.rollback(v3).version_id == v3  # explicit target
    assert reg.current().version_id == v3
    with pytest.raises(RegistryError):
        reg.promote("v9999")
    with pytest.raises(RegistryError):
        reg.get("../etc")


def test_corrupt_weights_never_served(tmp_path, caplog):
    reg = ModelRegistry(tmp_path / "reg")
    v1 = reg.publish(_weights(tmp_path, "a"), {})
    v2 = reg.publish(_weights(tmp_path, "b"), {}, parent=v1)
    reg.promote(v1)
    reg.promote(v2)
    assert reg.current().version_id == v2
    # Truncate the served file after publish (disk trouble, a partial sync on a shared volume).
    w = reg.get(v2).weights
    with open(w, "r+b") as f:
        f.truncate(100)
    with caplog.at_level("ERROR"):
        cur = reg.current()
    assert cur.version_id == v1
    assert any(v2 in r.getMessage() for r in caplog.records)
    assert reg.pointed() == v2  # reading never rewrites the pointer
    assert not reg.is_valid(v2)
    with pytest.raises(RegistryError):
        reg.promote(v2)  # a corrupt version cannot become current
    with pytest.raises(RegistryError):
        reg.rollback(v2)
    # Same size, different content (bit rot) is caught by the sha256 too.
    w1 = reg.get(v1).weights
    data = bytearray(w1.read_bytes())
    data[10] ^= 0xFF
    time.sleep(0.01)
    w1.write_bytes(bytes(data))
    assert reg.current() is None


def test_missing_version_folder_falls_back(tmp_path):
    import shutil

    reg = ModelRegistry(tmp_path / "reg")
    v1 = reg.publish(_weights(tmp_path, "a"), {})
    v2 = reg.publish(_weights(tmp_path, "b"), {})
    reg.promote(v1)
    reg.promote(v2)
    shutil.rmtree(reg.get(v2).path)
    assert reg.current().version_id == v1


def test_failed_validation_publishes_nothing(tmp_path):
    reg = ModelRegistry(tmp_path / "reg")
    v1 = reg.publish(_weights(tmp_path, "a"), {}, validate=_check)
    reg.promote(v1)
    bad = _weights(tmp_path, "bad", b"garbage" * 10)
    with pytest.raises(RegistryError, match="validation") as exc:
        reg.publish(bad, {}, validate=_check)
    assert isinstance(exc.value.__cause__, ValueError)
    assert [v.version_id for v in reg.versions()] == [v1]
    assert reg.current().version_id == v1 and reg.pointed() == v1
    assert list(reg.tmp_dir.iterdir()) == []  # the temp copy is removed
    with pytest.raises(RegistryError):
        reg.publish(tmp_path / "missing.pt", {})
    with pytest.raises(RegistryError):
        reg.publish(_weights(tmp_path, "c"), {}, parent="v0042")
    assert [v.version_id for v in reg.versions()] == [v1]


def test_concurrent_publishes_and_promotes(tmp_path):
    reg = ModelRegistry(tmp_path / "reg")
    files = [_weights(tmp_path, f"m{i}") for i in range(8)]
    ids: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(i):
        try:
            # A separate registry object per thread: the flock is what must serialise them.
            r = ModelRegistry(tmp_path / "reg")
            vid = r.publish(files[i], {"i": i})
            r.promote(vid)
            with lock:
                ids.append(vid)
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(ids)) == 8
    versions = reg.versions()
    assert sorted(v.version_id for v in versions) == sorted(ids)
    for v in versions:  # each version holds exactly the file its publisher gave
        assert v.weights.read_bytes() == files[v.metrics["i"]].read_bytes()
    cur = reg.current()
    assert cur is not None and cur.version_id in ids
    assert sorted(reg.history()) == sorted(ids) and reg.history()[-1] == cur.version_id


def test_leftover_temp_dirs_are_ignored_and_cleaned(tmp_path):
    reg = ModelRegistry(tmp_path / "reg", stale_tmp_s=60)
    # A crash mid-publish leaves a temp folder; a broken entry in versions/ has no meta.
    stale = reg.tmp_dir / "publish-deadbeef"
    stale.mkdir()
    (stale / "weights.pt").write_bytes(b"MODEL:half")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    fresh = reg.tmp_dir / "publish-inflight"
    fresh.mkdir()
    (reg.versions_dir / "v0007").mkdir()
    (reg.versions_dir / "v0007" / "weights.pt").write_bytes(b"MODEL:x")
    assert reg.versions() == [] and reg.current() is None
    vid = reg.publish(_weights(tmp_path, "a"), {})
    assert [v.version_id for v in reg.versions()] == [vid]
    assert not stale.exists()  # stale leftovers are cleaned
    assert fresh.exists()  # a recent one may be another publisher's: left alone
    assert vid == "v0008"  # ids never reuse a name already on disk
    # An unreadable pointer serves nothing rather than crashing.
    reg.pointer.write_text("{broken")
    assert reg.current() is None
    reg.promote(vid)
    assert reg.current().version_id == vid
