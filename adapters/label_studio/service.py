"""The work behind the routes: images -> cached embeddings -> regions -> Label Studio results.

One Service per process holds the segmenter, the embedding cache and the media fetcher. It is
thread-safe: gunicorn's threads call it concurrently.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ... import __version__
from ...backends.cache import ByteLRU
from ...backends.image import content_hash
from ...backends.segment import Embedding, Segmenter
from ...backends.shared_cache import SharedEmbeddingCache
from ..errors import ApiError
from .config import ParsedConfig
from .interactive import SmartRequest
from .media import MediaFetcher
from .prelabel import Prelabeler
from .results import mask_results

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageRef:
    url: str
    task_id: int | None


class Service:
    def __init__(self, segmenter: Segmenter, fetcher: MediaFetcher, cache_bytes: int,
                 polygon_tolerance: float = 1.0, warm_workers: int = 1, prelabeler: Prelabeler | None = None,
                 shared: SharedEmbeddingCache | None = None):
        self.segmenter = segmenter
        self.prelabeler = prelabeler
        self.fetcher = fetcher
        self.polygon_tolerance = polygon_tolerance
        self.cache: ByteLRU[Embedding] = ByteLRU(cache_bytes, lambda e: e.nbytes)  # L1: this process
        self.shared = shared  # L2: Redis, shared by the replicas (REDIS_URL)
        self.encoder_runs = 0  # embeddings computed here (neither level had them)
        # url -> content key, so a click on a known image skips download, decode and hashing.
        self._keys: OrderedDict[ImageRef, tuple] = OrderedDict()
        self._keys_lock = threading.Lock()
        self._warm_pool = ThreadPoolExecutor(max_workers=warm_workers, thread_name_prefix="warm")
        self._warming: set[ImageRef] = set()

    @property
    def model_version(self) -> str:
        version = f"labelassist-{__version__}-{self.segmenter.model_id}"
        model = self.prelabeler.default if self.prelabeler else None
        if model is not None and model.detector.trained:
            # The detector's weights and the score definition/calibration: either changing changes it.
            version += f"-{model.model_version}"
        return version

    def describe(self) -> dict:
        info = dict(self.segmenter.describe())
        if self.prelabeler is not None:
            model = self.prelabeler.default
            info["detector"] = {**model.detector.describe(), "score_version": model.score_version,
                                "registry_version": getattr(self, "registry_version", None)}
        return info

    # --- embeddings -------------------------------------------------------------------------
    def embedding_for(self, ref: ImageRef) -> Embedding:
        with self._keys_lock:
            key = self._keys.get(ref)
            if key is not None:
                self._keys.move_to_end(ref)
        if key is not None:
            cached = self.cache.get(key)
            if cached is not None:
                return cached
        image = self.fetcher.load_image(ref.url, ref.task_id)
        key = (content_hash(image), self.segmenter.model_id)
        with self._keys_lock:
            self._keys[ref] = key
            while len(self._keys) > 8192:
                self._keys.popitem(last=False)
        return self.cache.get_or_compute(key, lambda: self._embedding_miss(key, image))

    def _embedding_miss(self, key: tuple, image) -> Embedding:
        """Not in this process (L1): from the shared cache if there, else computed (and shared)."""
        if self.shared is None:
            return self._embed(image)
        content, model_id = key
        return self.shared.get_or_compute(f"{model_id}:{content}", lambda: self._embed(image), self.segmenter)

    def _embed(self, image) -> Embedding:
        with self._keys_lock:
            self.encoder_runs += 1
        return self.segmenter.embed(image)

    def warm(self, refs: list[ImageRef]) -> int:
        """Compute embeddings in the background; returns how many were queued."""
        queued = 0
        for ref in refs:
            with self._keys_lock:
                if ref in self._warming:
                    continue
                self._warming.add(ref)
            self._warm_pool.submit(self._warm_one, ref)
            queued += 1
        return queued

    def _warm_one(self, ref: ImageRef) -> None:
        try:
            self.embedding_for(ref)
        except Exception as exc:  # a warm-up failure only costs the first click its speed
            log.warning("cache warm-up failed for task %s: %s", ref.task_id, getattr(exc, "message", exc))
        finally:
            with self._keys_lock:
                self._warming.discard(ref)

    # --- interactive ------------------------------------------------------------------------
    def interactive(self, task: dict, request: SmartRequest, config: ParsedConfig) -> dict:
        outputs = config.mask_outputs(request.image)
        if not outputs:
            raise ApiError(400, f"the label config has no BrushLabels or PolygonLabels control for "
                                f"image {request.image!r} to hold a mask")
        usable = [c for c in outputs if not c.labels or request.label is None or request.label in c.labels]
        if not usable:
            raise ApiError(400, f"no BrushLabels/PolygonLabels control for image {request.image!r} has "
                                f"the label {request.label!r}")
        embedding = self.embedding_for(image_ref(task, config, request.image))
        height, width = embedding.image_size
        region = self.segmenter.segment(embedding, request.to_prompt(width, height))
        results = []
        for control in usable:
            label = request.label or (control.labels[0] if control.labels else None)
            result = mask_results(region, control, request.image, label, self.polygon_tolerance)
            if result is not None:
                results.append(result)
        return {"result": results, "score": region.score, "model_version": self.model_version}

    # --- following the model registry --------------------------------------------------------
    def follow_registry(self, registry, load, served: str | None, every: float = 1.0) -> None:
        """Serve the registry's current version: checked (one small file read) at most every
        `every` seconds, loaded when it moves (training here or on a worker, a rollback)."""
        self._registry, self._load_model, self.registry_version = registry, load, served
        self._follow_every, self._follow_checked = every, 0.0
        self._follow_lock = threading.Lock()

    def refresh_model(self, force: bool = False) -> None:
        registry = getattr(self, "_registry", None)
        if registry is None or self.prelabeler is None:
            return
        now = time.monotonic()
        if not force and now - self._follow_checked < self._follow_every:
            return
        with self._follow_lock:
            if not force and now - self._follow_checked < self._follow_every:
                return
            self._follow_checked = now
            if registry.pointed() == self.registry_version:
                return
            current = registry.current()  # the pointed version if intact, else an earlier one
            if current is None or current.version_id == self.registry_version:
                return
            try:
                model = self._load_model(current.weights)
            except Exception as exc:  # keep serving what we have; try again on the next check
                log.error("cannot load model version %s, still serving %s: %s", current.version_id,
                          self.registry_version, exc)
                return
            self.prelabeler.default, self.registry_version = model, current.version_id
        log.info("now serving model version %s (%s)", current.version_id, self.model_version)

    # --- pre-labels -------------------------------------------------------------------------
    def prelabel(self, tasks: list[dict], config: ParsedConfig) -> list[dict]:
        """One prediction per task, in order: detector pre-labels with a task score that is low when
        the pre-annotation probably needs work."""
        targets = self.prelabeler.targets(config) if self.prelabeler else []
        if not targets:
            return [{"result": [], "score": 0.0, "model_version": self.model_version} for _ in tasks]
        needed = {t.image for t in targets}
        images = []
        for task in tasks:
            images.append({name: self.fetcher.load_image(ref.url, ref.task_id)
                           for name in needed for ref in [image_ref(task, config, name)]})
        return [{"result": results, "score": round(1.0 - difficulty, 4), "model_version": self.model_version}
                for results, difficulty in self.prelabeler.predict(tasks, images, targets)]

    def shutdown(self) -> None:
        self._warm_pool.shutdown(wait=False, cancel_futures=True)


def image_ref(task: dict, config: ParsedConfig, image: str) -> ImageRef:
    key = config.data_key(image)
    data = task.get("data") if isinstance(task, dict) else None
    if not isinstance(data, dict):
        raise ApiError(400, "task has no data object")
    url = data.get(key)
    if not isinstance(url, str) or not url:
        raise ApiError(400, f"task {task.get('id')} has no image URL in data[{key!r}]")
    task_id = task.get("id")
    return ImageRef(url=url, task_id=task_id if isinstance(task_id, int) else None)
