import threading
import time

import pytest

from labelassist.backends.cache import ByteLRU


def test_bounded_by_bytes_and_evicts_least_recently_used():
    cache = ByteLRU(100, size_of=len)
    cache.put("a", b"x" * 40)
    cache.put("b", b"x" * 40)
    assert cache.get("a") is not None  # "a" is now the most recent
    cache.put("c", b"x" * 40)  # over 100: evicts "b"
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.stats.bytes == 80 and cache.stats.evictions == 1


def test_value_larger_than_bound_is_returned_not_kept():
    cache = ByteLRU(10, size_of=len)
    assert cache.get_or_compute("big", lambda: b"y" * 11) == b"y" * 11
    assert "big" not in cache and cache.stats.bytes == 0


def test_concurrent_first_requests_compute_once():
    cache = ByteLRU(1000, size_of=len)
    runs = []
    gate = threading.Event()

    def compute():
        runs.append(1)
        gate.wait(5)
        return b"z" * 10

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_or_compute("k", compute)))
               for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    gate.set()
    for t in threads:
        t.join(5)
    assert len(runs) == 1 and len(results) == 8 and set(results) == {b"z" * 10}
    assert cache.stats.misses == 1 and cache.stats.waits == 7


def test_failed_computation_is_not_cached_and_reaches_waiters():
    cache = ByteLRU(1000, size_of=len)
    with pytest.raises(RuntimeError):
        cache.get_or_compute("k", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert "k" not in cache
    assert cache.get_or_compute("k", lambda: b"ok") == b"ok"
