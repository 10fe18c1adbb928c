"""The second level of the embedding cache: Redis, shared by every replica (REDIS_URL).

An embedding one replica computed serves clicks on all of them. Lookups go in-process LRU (L1,
backends/cache.py) -> Redis (L2, here) -> the encoder; what the encoder computes is written here.

Stored values. `Segmenter.dump_embedding` turns an embedding into named numpy arrays in a small
format of its own (no pickle: a value read from Redis can be wrong, never code), float arrays as
float16 when `fp16`; the bytes are zlib-compressed (level 1: fast) behind a one-byte codec tag.
A value that does not decode (damaged, foreign, another format) is a miss, never an error.

Keys (all under `prefix`, format version in it so two releases never read each other's values):
    <prefix>e:<model id>:<image content hash>   the value, with a TTL
    <prefix>lru     sorted set: entry key -> last use (a sequence number from <prefix>clock)
    <prefix>size    hash: entry key -> stored bytes
    <prefix>bytes   counter: sum of `size`
    <prefix>clock   counter: the last use handed out
    <prefix>lock:<key>  single flight across replicas (SET NX PX, a random token)

Bound and TTL. Every write and every hit runs as one Lua script, so the index and the values
change together. A hit refreshes the entry's TTL and its last use (sliding expiry), so the sorted
set orders entries by expiry too. A write forgets the entries at the bottom of the set whose value
is gone (TTL ran out), and evicts the least recently used until `bytes` <= `max_bytes`. An entry larger than
`max_bytes` is never stored. The index keys have no TTL: a Redis `maxmemory` with a volatile-*
policy (the one to use when Redis also holds the RQ queue) can evict values but never the index;
an index entry whose value Redis evicted is counted until its TTL or LRU turn comes (it errs on
the side of holding less). Standalone Redis (or a Sentinel primary): the scripts touch keys they
compute, which Redis Cluster does not allow.

Single flight. Concurrent first clicks within a process already share one computation (L1). Across
replicas, the first to miss takes a short lock; the others poll for the value until the lock is
released or `wait` seconds pass, then compute themselves. The owner writes the value (on a
background thread: the click that computed it does not wait for compression and the network)
and then releases the lock.

Redis down or slow: an error makes every call skip Redis for `retry_after` seconds (counted in
`stats.errors`); clicks carry on with L1 and the encoder.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Protocol

log = logging.getLogger(__name__)

FORMAT = 1
_ZLIB = b"Z"  # codec tag: zlib (room for others: a reader refuses tags it does not know)
REDIS_STRING_LIMIT = 512 * 1024 * 1024


class Codec(Protocol):
    """What the cache needs of a segmenter (backends/segment/base.py implements it)."""

    def dump_embedding(self, embedding: Any, fp16: bool = True) -> bytes: ...

    def load_embedding(self, blob: bytes) -> Any: ...


@dataclass
class SharedCacheStats:
    hits: int = 0  # found in Redis
    misses: int = 0  # computed here: not in Redis (or unusable, or Redis down, or the wait ran out)
    waits: int = 0  # found in Redis after waiting for another replica's computation
    corrupt: int = 0  # values that did not decode (counted in misses too)
    errors: int = 0  # Redis errors (each one skips Redis for `retry_after` seconds)
    writes: int = 0  # values stored
    skipped: int = 0  # values not stored: larger than the bound, or the write queue full
    bytes_read: int = 0  # compressed bytes read from hits
    bytes_written: int = 0  # compressed bytes stored


# Last use is a sequence number (INCR of `clock`), not a time: a strict order even for uses within
# the same millisecond, and no clocks to agree on.
# KEYS: entry, lru, clock. ARGV: ttl ms. The value, with its TTL and last use refreshed; nil if absent.
_GET = """
local v = redis.call('GET', KEYS[1])
if v then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  redis.call('ZADD', KEYS[2], 'XX', redis.call('INCR', KEYS[3]), KEYS[1])
end
return v
"""

# KEYS: entry, lru, size, bytes, clock. ARGV: value, ttl ms, max bytes. Stores the value, forgets the
# entries whose TTL ran out (with a sliding TTL they are the least recently used ones: the bottom of
# the sorted set), then evicts least recently used ones down to the bound. Returns {total bytes,
# entries evicted}.
_PUT = """
local max = tonumber(ARGV[3])
local function forget(key)
  local n = tonumber(redis.call('HGET', KEYS[3], key) or '0')
  redis.call('HDEL', KEYS[3], key)
  redis.call('ZREM', KEYS[2], key)
  redis.call('DEL', key)
  return redis.call('DECRBY', KEYS[4], n)
end
local size = string.len(ARGV[1])
local old = tonumber(redis.call('HGET', KEYS[3], KEYS[1]) or '0')
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[5]), KEYS[1])
redis.call('HSET', KEYS[3], KEYS[1], size)
local total = redis.call('INCRBY', KEYS[4], size - old)
local evicted = 0
while true do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #oldest == 0 or oldest[1] == KEYS[1] then break end
  if redis.call('EXISTS', oldest[1]) == 1 then
    if total <= max then break end
    evicted = evicted + 1
  end
  total = forget(oldest[1])
end
return {total, evicted}
"""

# KEYS: lock. ARGV: token. Deletes the lock only if it is still ours.
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class SharedEmbeddingCache:
    """Embeddings in Redis, bounded by bytes, with a sliding TTL and single flight across replicas.

    `client` is a redis.Redis (thread-safe; give it short socket timeouts: `from_url` does).
    """

    def __init__(self, client, ttl: float = 3600, max_bytes: int = 1 << 30, fp16: bool = True,
                 wait: float = 30.0, prefix: str = "labelassist:emb:", level: int = 1,
                 max_raw_bytes: int = 1 << 30, retry_after: float = 10.0, max_pending_writes: int = 8):
        self.client = client
        self.ttl_ms = max(1, int(ttl * 1000))
        self.max_bytes = int(max_bytes)
        self.max_item_bytes = min(self.max_bytes, REDIS_STRING_LIMIT)
        self.fp16 = fp16
        self.wait = float(wait)
        self.prefix = f"{prefix}v{FORMAT}:"
        self.level = level
        self.max_raw_bytes = int(max_raw_bytes)
        self.retry_after = retry_after
        self.max_pending_writes = max_pending_writes
        self.stats = SharedCacheStats()
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._pending = 0
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shared-cache-write")
        self._get = client.register_script(_GET)
        self._put = client.register_script(_PUT)
        self._unlock = client.register_script(_UNLOCK)

    @classmethod
    def from_url(cls, url: str, **kw) -> "SharedEmbeddingCache":
        from redis import Redis

        return cls(Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5, health_check_interval=30), **kw)

    # --- keys -------------------------------------------------------------------------------
    def _entry(self, key: str) -> str:
        return f"{self.prefix}e:{key}"

    @property
    def _index(self) -> tuple[str, str, str, str]:
        return f"{self.prefix}lru", f"{self.prefix}size", f"{self.prefix}bytes", f"{self.prefix}clock"

    # --- values -----------------------------------------------------------------------------
    def encode(self, embedding: Any, codec: Codec) -> bytes:
        return _ZLIB + zlib.compress(codec.dump_embedding(embedding, fp16=self.fp16), self.level)

    def decode(self, value: bytes, codec: Codec) -> Any:
        """The embedding in `value`; ValueError, zlib.error or EmbeddingFormatError when it is not
        one of ours."""
        if value[:1] != _ZLIB:
            raise ValueError("unknown codec tag")
        d = zlib.decompressobj()
        raw = d.decompress(value[1:], self.max_raw_bytes + 1)
        if len(raw) > self.max_raw_bytes or d.unconsumed_tail or not d.eof:
            raise ValueError("value does not decompress to a complete embedding within the size limit")
        return codec.load_embedding(raw)

    # --- the cache --------------------------------------------------------------------------
    def get(self, key: str, codec: Codec) -> Any | None:
        """The cached embedding, or None (absent, unusable, or Redis unavailable)."""
        value = self._call(lambda: self._get(keys=[self._entry(key), self._index[0], self._index[3]], args=[self.ttl_ms]))
        if value is None:
            return None
        try:
            embedding = self.decode(value, codec)
        except Exception as exc:  # damaged, foreign, another format: never a crash
            log.warning("shared cache: unusable value for %s (%s): treated as a miss", key, exc)
            with self._lock:
                self.stats.corrupt += 1
            return None
        with self._lock:
            self.stats.bytes_read += len(value)
        return embedding

    def get_or_compute(self, key: str, compute: Callable[[], Any], codec: Codec) -> Any:
        """From Redis if there; else computed once across replicas (as far as the lock holds) and
        written back."""
        embedding = self.get(key, codec)
        waited = owner = False
        token, lock = uuid.uuid4().hex, f"{self.prefix}lock:{key}"
        if embedding is None and self._available():
            owner = bool(self._call(lambda: self.client.set(lock, token, nx=True, px=max(1, int(self.wait * 1000)))))
            if owner:
                # The previous owner writes before it unlocks: look once more now that the lock is ours.
                embedding = self.get(key, codec)
                if embedding is not None:
                    self._call(lambda: self._unlock(keys=[lock], args=[token]))
                    owner = False
            elif self._available():  # another replica is computing it
                embedding = self._wait_for(key, lock, codec)
                waited = embedding is not None
        with self._lock:
            if embedding is None:
                self.stats.misses += 1
            elif waited:
                self.stats.waits += 1
            else:
                self.stats.hits += 1
        if embedding is not None:
            return embedding
        try:
            embedding = compute()
        except BaseException:
            if owner:
                self._call(lambda: self._unlock(keys=[lock], args=[token]))
            raise
        self.put(key, embedding, codec, unlock=(lock, token) if owner else None)
        return embedding

    def put(self, key: str, embedding: Any, codec: Codec, unlock: tuple[str, str] | None = None,
            background: bool = True) -> None:
        """Store `embedding` (encoding and writing on the writer thread unless not `background`);
        `unlock` is released afterwards."""
        if not self._available():
            return
        with self._lock:
            full = self._pending >= self.max_pending_writes
            if full:
                self.stats.skipped += 1
            else:
                self._pending += 1
        if full:
            if unlock:
                self._call(lambda: self._unlock(keys=[unlock[0]], args=[unlock[1]]))
            return
        if background:
            self._writer.submit(self._write, key, embedding, codec, unlock)
        else:
            self._write(key, embedding, codec, unlock)

    def _write(self, key: str, embedding: Any, codec: Codec, unlock: tuple[str, str] | None) -> None:
        try:
            try:
                value = self.encode(embedding, codec)
            except NotImplementedError as exc:  # a segmenter whose embeddings cannot be shared
                log.debug("shared cache: not storing %s: %s", key, exc)
                value = None
            if value is not None and len(value) > self.max_item_bytes:
                log.warning("shared cache: %s is %d bytes, over the bound of %d: not stored", key, len(value),
                            self.max_item_bytes)
                value = None
            if value is None:
                with self._lock:
                    self.stats.skipped += 1
            else:
                done = self._call(lambda: self._put(keys=[self._entry(key), *self._index],
                                                    args=[value, self.ttl_ms, self.max_bytes]))
                if done is not None:
                    with self._lock:
                        self.stats.writes += 1
                        self.stats.bytes_written += len(value)
        except Exception:  # never let a write kill the writer thread
            log.exception("shared cache: storing %s failed", key)
        finally:
            with self._lock:
                self._pending -= 1
            if unlock:
                self._call(lambda: self._unlock(keys=[unlock[0]], args=[unlock[1]]))

    def _wait_for(self, key: str, lock: str, codec: Codec) -> Any | None:
        """Poll while another replica computes: the value once it is there, None when the lock is
        gone without a value or after `wait` seconds."""
        deadline = time.monotonic() + self.wait
        pause = 0.01
        while time.monotonic() < deadline:
            time.sleep(pause)
            pause = min(pause * 1.5, 0.2)
            state = self._call(lambda: self.client.pipeline(transaction=False)
                               .exists(self._entry(key)).exists(lock).execute())
            if state is None:
                return None
            present, locked = state
            if present:
                return self.get(key, codec)
            if not locked:
                return None
        return None

    def used_bytes(self) -> int | None:
        """Bytes the shared cache holds (all replicas' entries), or None when Redis is unavailable."""
        value = self._call(lambda: self.client.get(self._index[2]))
        return None if value is None and not self._available() else int(value or 0)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until the writes queued so far are done (tests, shutdown)."""
        self._writer.submit(lambda: None).result(timeout)

    def close(self) -> None:
        self._writer.shutdown(wait=True)

    # --- Redis availability -----------------------------------------------------------------
    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _call(self, fn: Callable[[], Any]) -> Any | None:
        """fn() against Redis; None (and Redis skipped for a while) when Redis fails."""
        if not self._available():
            return None
        from redis import RedisError

        try:
            return fn()
        except (RedisError, OSError) as exc:
            with self._lock:
                self.stats.errors += 1
                first = self._available()
                self._down_until = time.monotonic() + self.retry_after
            if first:
                log.warning("shared cache: Redis unavailable (%s): skipping it for %.0f s", exc, self.retry_after)
            return None
