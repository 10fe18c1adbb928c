"""Embedding cache: bounded by bytes, thread-safe, one computation per key ("single flight").

Keys are (image content hash, model id). Concurrent first clicks on a new image wait for the one
computation already under way instead of starting their own.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Generic, Hashable, TypeVar

V = TypeVar("V")


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    waits: int = 0  # callers that joined a computation already under way
    evictions: int = 0
    bytes: int = 0
    entries: int = 0


class ByteLRU(Generic[V]):
    """An LRU cache bounded by the total `size_of(value)` of its entries.

    A value larger than the whole bound is returned to its caller but not kept.
    """

    def __init__(self, max_bytes: int, size_of: Callable[[V], int]):
        self.max_bytes = int(max_bytes)
        self._size_of = size_of
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._inflight: dict[Hashable, Future[V]] = {}
        self._lock = threading.Lock()
        self._bytes = 0
        self.stats = CacheStats()

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            self.stats.hits += 1
            return item[0]

    def get_or_compute(self, key: Hashable, compute: Callable[[], V]) -> V:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
                self.stats.hits += 1
                return item[0]
            future = self._inflight.get(key)
            owner = future is None
            if owner:
                future = Future()
                self._inflight[key] = future
                self.stats.misses += 1
            else:
                self.stats.waits += 1
        if not owner:
            return future.result()
        try:
            value = compute()
        except BaseException as exc:
            with self._lock:
                del self._inflight[key]
            future.set_exception(exc)
            raise
        with self._lock:
            del self._inflight[key]
            self._store(key, value)
        future.set_result(value)
        return value

    def put(self, key: Hashable, value: V) -> None:
        with self._lock:
            self._store(key, value)

    def _store(self, key: Hashable, value: V) -> None:
        size = int(self._size_of(value))
        old = self._items.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        if size <= self.max_bytes:
            self._items[key] = (value, size)
            self._bytes += size
        while self._bytes > self.max_bytes and self._items:
            _, (_, evicted) = self._items.popitem(last=False)
            self._bytes -= evicted
            self.stats.evictions += 1
        self.stats.bytes = self._bytes
        self.stats.entries = len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0
            self.stats.bytes = 0
            self.stats.entries = 0
