"""Flask application factory speaking Label Studio's ML-backend protocol.

Routes: GET / and /health, POST /setup, POST /predict, POST /webhook, GET /metrics.
Bad input always gets a 4xx JSON answer {"error": "..."}; nothing else ever sees a traceback.
"""
from __future__ import annotations

import hmac
import json
import logging
import time
from pathlib import Path

from flask import Flask, Response, g, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from werkzeug.exceptions import HTTPException

from ...settings import Settings, get_settings
from ..errors import ApiError
from .config import parse_label_config
from .interactive import parse_context
from .media import MediaError, MediaFetcher
from .service import ImageRef, Service, image_ref
from .training import Trainer
from ...jobs import JobRunner, RQJobRunner

log = logging.getLogger(__name__)


def _json_body() -> dict:
    body = request.get_json(silent=True, force=True)
    if body is None:
        raise ApiError(400, "request body is not valid JSON")
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def _tasks(body: dict) -> list[dict]:
    tasks = body.get("tasks")
    if tasks is None:
        raise ApiError(400, "missing 'tasks': /predict needs a list of tasks")
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise ApiError(400, "'tasks' must be a list of task objects")
    return tasks


class Metrics:
    def __init__(self, service: Service, trainer: Trainer | None = None):
        self.registry = CollectorRegistry()
        self.requests = Counter("labelassist_requests", "HTTP requests", ["route", "status"], registry=self.registry)
        self.latency = Histogram("labelassist_request_seconds", "Request latency", ["route", "mode"],
                                 registry=self.registry,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 100))
        stats = service.cache.stats
        for name, doc, fn in [
            ("labelassist_embedding_cache_hits", "Embedding cache hits", lambda: stats.hits),
            ("labelassist_embedding_cache_misses", "In-process embedding cache misses (encoder runs, or "
             "reads from the shared cache with REDIS_URL)", lambda: stats.misses),
            ("labelassist_embedding_cache_waits", "Clicks that waited for an embedding under way", lambda: stats.waits),
            ("labelassist_embedding_cache_bytes", "Bytes held by the embedding cache", lambda: stats.bytes),
            ("labelassist_embedding_cache_entries", "Embeddings held", lambda: stats.entries),
        ]:
            Gauge(name, doc, registry=self.registry).set_function(fn)
        self.registry.register(_LiveMetrics(service, trainer))


class _LiveMetrics:
    """Read at each scrape: the model version served now (it changes when a new version is
    promoted), encoder runs, the shared embedding cache, and the training jobs."""

    def __init__(self, service: Service, trainer: Trainer | None):
        self.service, self.trainer = service, trainer

    def collect(self):
        service = self.service
        info = GaugeMetricFamily("labelassist_model_info", "Model serving (1 for the version served now)",
                                 labels=["model_version"])
        info.add_metric([service.model_version], 1)
        yield info
        yield CounterMetricFamily("labelassist_embedding_encoder_runs", "Embeddings computed by this process "
                                  "(in neither the in-process nor the shared cache)", value=service.encoder_runs)
        shared = service.shared
        if shared is not None:
            st = shared.stats
            for name, doc, value in [
                ("hits", "Embeddings found in the shared cache (Redis)", st.hits),
                ("misses", "Embeddings not in the shared cache", st.misses),
                ("waits", "Embeddings found after waiting for another replica computing them", st.waits),
                ("corrupt", "Shared-cache values that did not decode (treated as misses)", st.corrupt),
                ("errors", "Redis errors of the shared cache", st.errors),
                ("writes", "Embeddings written to the shared cache", st.writes),
                ("skipped", "Embeddings not written (over the bound, or writes backed up)", st.skipped),
                ("read_bytes", "Compressed bytes read from the shared cache", st.bytes_read),
                ("written_bytes", "Compressed bytes written to the shared cache", st.bytes_written),
            ]:
                yield CounterMetricFamily(f"labelassist_shared_cache_{name}", doc, value=value)
            used = shared.used_bytes()
            if used is not None:
                yield GaugeMetricFamily("labelassist_shared_cache_bytes",
                                        "Bytes the shared cache holds in Redis (all replicas)", value=used)
        runner = self.trainer.runner if self.trainer is not None else None
        if runner is not None:
            try:
                counts = runner.counts()
                queue = getattr(runner, "queue", None)
                depth = queue.count if queue is not None else counts.get("queued", 0)
            except Exception as exc:  # Redis down: leave the job gauges out of this scrape
                log.warning("metrics: cannot read job counts: %s", exc)
                return
            jobs = GaugeMetricFamily("labelassist_jobs", "Training jobs by state", labels=["state"])
            for state in sorted({"queued", "running", "finished", "failed", *counts}):
                jobs.add_metric([state], counts.get(state, 0))
            yield jobs
            yield GaugeMetricFamily("labelassist_job_queue_depth", "Jobs waiting in the queue", value=depth)


def create_app(settings: Settings | None = None, service: Service | None = None,
               trainer: Trainer | None = None) -> Flask:
    settings = settings or get_settings()
    if service is None:
        service = build_service(settings)
        trainer = Trainer(settings, make_runner(settings))
    app = Flask("labelassist")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.extensions["labelassist"] = service
    metrics = Metrics(service, trainer)
    log.info("serving %s (%s)", service.model_version, service.segmenter.describe())

    @app.before_request
    def _start():
        g.start = time.perf_counter()
        g.mode = "-"
        if request.path in ("/", "/health", "/setup", "/predict"):
            # A newly promoted (or rolled back) version is picked up here; /setup looks every time.
            service.refresh_model(force=request.path == "/setup")
        if settings.basic_auth_enabled and request.path not in ("/", "/health"):
            auth = request.authorization
            ok = (auth is not None and auth.type == "basic"
                  and hmac.compare_digest((auth.username or "").encode(), settings.basic_auth_user.encode())
                  and hmac.compare_digest((auth.password or "").encode(),
                                          settings.basic_auth_pass.get_secret_value().encode()))
            if not ok:
                resp = jsonify(error="authentication required")
                resp.status_code = 401
                resp.headers["WWW-Authenticate"] = 'Basic realm="labelassist"'
                return resp

    @app.after_request
    def _count(resp: Response):
        route = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.requests.labels(route, str(resp.status_code)).inc()
        metrics.latency.labels(route, g.get("mode", "-")).observe(time.perf_counter() - g.get("start", time.perf_counter()))
        return resp

    @app.errorhandler(ApiError)
    @app.errorhandler(MediaError)
    def _api_error(exc):
        log.warning("%s %s -> %s: %s", request.method, request.path, exc.status, exc.message)
        return jsonify(error=exc.message), exc.status

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        message = {413: f"request body is larger than the limit of {settings.max_request_bytes} bytes"}.get(
            exc.code, exc.description)
        return jsonify(error=message), exc.code

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.path)
        return jsonify(error=f"internal error ({type(exc).__name__}); see the backend's log"), 500

    @app.get("/")
    @app.get("/health")
    def health():
        return jsonify(status="UP", model_class="labelassist", model_version=service.model_version,
                       role=settings.role, **service.describe())

    @app.post("/setup")
    def setup():
        body = _json_body()
        schema = body.get("schema")
        answer = {"model_version": service.model_version}
        if schema:
            config = parse_label_config(schema)
            if service.prelabeler is not None:
                # Labels no model class maps to get no pre-labels: say so, the user can add
                # predicted_values="class_a,class_b" to the <Label>.
                answer["labels_without_model_class"] = service.prelabeler.unmatched_labels(config)
        return jsonify(answer)

    @app.post("/predict")
    def predict():
        body = _json_body()
        tasks = _tasks(body)
        config = parse_label_config(body.get("label_config"))
        params = body.get("params") or {}
        context = params.get("context") if isinstance(params, dict) else None
        if context:
            if settings.role == "prelabel":
                raise ApiError(409, "this replica serves pre-labels only (ROLE=prelabel); "
                                    "connect interactive annotation to a replica with ROLE=all or interactive")
            if not isinstance(context, dict):
                raise ApiError(400, "params.context must be an object")
            if not tasks:
                raise ApiError(400, "an interactive request needs one task")
            g.mode = "interactive"
            smart = parse_context(context, config)
            return jsonify(results=[service.interactive(tasks[0], smart, config)])
        g.mode = "batch"
        if settings.role == "interactive":
            raise ApiError(409, "this replica serves interactive clicks only (ROLE=interactive); "
                                "pre-labels come from a replica with ROLE=all or prelabel")
        if settings.warm_cache_on_predict and settings.role != "prelabel":
            service.warm(_refs(tasks, config))
        return jsonify(results=service.prelabel(tasks, config))

    @app.post("/webhook")
    def webhook():
        body = _json_body()
        action = body.get("action")
        if not isinstance(action, str) or not action:
            raise ApiError(400, "webhook body has no 'action'")
        if action == "START_TRAINING" or action.startswith("ANNOTATION"):
            return _training_event(action, body)
        if action == "TASKS_CREATED" and settings.warm_cache_on_predict and settings.role != "prelabel":
            project = body.get("project") or {}
            config = parse_label_config(project.get("label_config")) if isinstance(project, dict) else None
            tasks = body.get("tasks") or []
            if config is None or not isinstance(tasks, list):
                raise ApiError(400, "TASKS_CREATED needs project.label_config and a list of tasks")
            queued = service.warm(_refs([t for t in tasks if isinstance(t, dict)], config))
            return jsonify(status="ok", action=action, warming=queued), 200
        return jsonify(status="ignored", action=action), 200

    def _training_event(action: str, body: dict):
        project = body.get("project")
        project_id = project.get("id") if isinstance(project, dict) else project
        if isinstance(project_id, str) and project_id.split(".")[0].isdigit():
            project_id = int(project_id.split(".")[0])
        if not isinstance(project_id, int) or isinstance(project_id, bool):
            raise ApiError(400, f"{action} needs the project id (project.id)")
        if trainer is None:
            raise ApiError(409, "this backend was started without training")
        if action != "START_TRAINING":
            # Label Studio sends annotation webhooks without credentials: a shared secret instead.
            secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
            given = request.args.get("secret") or request.headers.get("X-Labelassist-Secret") or ""
            if not secret or not hmac.compare_digest(given.encode(), secret.encode()):
                raise ApiError(401, "annotation webhooks need the shared secret (WEBHOOK_SECRET) "
                                    "as ?secret=... or an X-Labelassist-Secret header")
            started = trainer.annotation_event(project_id)
            if started is None:
                return jsonify(status="counted", action=action), 200
        else:
            started = trainer.start(project_id)
        job, created = started
        # Label Studio records `job` as the backend's train job id.
        return jsonify(status="queued" if created else "already running", job_id=job.id, job=job.id,
                       state=job.state, action=action), 201 if created else 200

    @app.get("/jobs/<job_id>")
    def job_status(job_id: str):
        job = trainer.runner.get(job_id) if trainer else None
        if job is None:
            raise ApiError(404, f"no job {job_id!r}")
        return jsonify(job.to_dict())

    @app.get("/metrics")
    def prometheus():
        return Response(generate_latest(metrics.registry), mimetype=CONTENT_TYPE_LATEST)

    return app


def build_service(settings: Settings, shared: bool = True) -> Service:
    """The segmenter, the detector (following the model registry) and the media fetcher these
    settings describe: what a server serves, and what bulk pre-labels use (same model_version)."""
    from ...backends.registry import ModelRegistry
    from ...backends.segment import create_segmenter

    # ROLE=prelabel answers no clicks: the classical segmenter stands in, no SAM is loaded.
    segmenter = create_segmenter("grabcut" if settings.role == "prelabel" else settings.segmenter,
                                 settings.sam_checkpoint, settings.sam_model_type,
                                 settings.device, settings.embedding_cache_fp16)
    prelabeler, load, served = build_prelabeler(settings, return_loader=True)
    service = Service(segmenter, MediaFetcher(settings), settings.embedding_cache_bytes,
                      settings.polygon_tolerance, prelabeler=prelabeler,
                      shared=make_shared_cache(settings) if shared else None)
    if settings.role != "interactive":  # ROLE=interactive serves no detector
        service.follow_registry(ModelRegistry(settings.registry_dir), load, served)
    return service


def make_shared_cache(settings: Settings):
    """The embedding cache shared by the replicas: in Redis when REDIS_URL is set (and SHARED_CACHE)."""
    if settings.redis_url is None or not settings.shared_cache:
        return None
    from ...backends.shared_cache import SharedEmbeddingCache

    return SharedEmbeddingCache.from_url(settings.redis_url.get_secret_value(), ttl=settings.shared_cache_ttl,
                                         max_bytes=settings.shared_cache_max_bytes,
                                         fp16=settings.embedding_cache_fp16, wait=settings.shared_cache_wait)


def make_runner(settings: Settings):
    """Training jobs: on the RQ queue when REDIS_URL is set (run by `labelassist worker`), else in a
    background thread of this process."""
    if settings.redis_url is not None:
        return RQJobRunner(settings.redis_url.get_secret_value(), settings.queue_name, settings.job_timeout)
    return JobRunner()


def build_prelabeler(settings: Settings, return_loader: bool = False):
    """The default detector from YOLO_WEIGHTS (a startup error if it cannot load), else untrained.

    Each detector is wrapped in an UncertaintyEstimator; a calibration file saved beside the weights
    (`<weights stem>.calibration.json`, written by `labelassist evaluate --save-calibration` or by
    training) is loaded with it.
    """
    from ...backends.detect import ModelLoadError, YoloDetector, create_detector
    from ...backends.uncertainty import UncertaintyEstimator, calibration_path

    from .prelabel import Prelabeler

    tta = tuple(v.strip() for v in settings.uncertainty_tta.split(",") if v.strip())

    def wrap(detector, calibration: Path | None = None):
        if calibration is not None and calibration.is_file():
            try:
                saved = json.loads(calibration.read_text())
                return UncertaintyEstimator.from_dict(detector, {**saved, "tta": tta or saved.get("tta", ())})
            except (ValueError, KeyError, TypeError) as exc:
                raise ModelLoadError(f"calibration file {calibration.name} is unreadable: {exc}") from None
        return UncertaintyEstimator(detector, tta=tta, low_conf=settings.uncertainty_low_conf)

    def load(path: Path):
        return wrap(create_detector(path, settings.device, settings.detect_conf), calibration_path(path))

    from ...backends.registry import ModelRegistry

    interactive_only = settings.role == "interactive"  # clicks only: no detector weights loaded
    current = None if interactive_only else ModelRegistry(settings.registry_dir).current()
    weights = None if interactive_only else settings.yolo_weights
    if weights is not None and not weights.is_absolute():
        weights = settings.models_dir / weights
    if current is not None:  # a version trained here wins over the configured base weights
        weights = current.weights
    default = load(weights) if weights else wrap(YoloDetector.untrained())
    if not default.detector.trained and not interactive_only:
        log.warning("detector is untrained (YOLO_WEIGHTS unset): pre-labels will be empty")
    prelabeler = Prelabeler(default, settings.models_dir, load, settings.polygon_tolerance, settings.detect_batch)
    return (prelabeler, load, current.version_id if current else None) if return_loader else prelabeler


def _refs(tasks: list[dict], config) -> list[ImageRef]:
    refs = []
    for task in tasks:
        for image in config.images:
            try:
                refs.append(image_ref(task, config, image))
            except ApiError:
                continue  # a task without this image has nothing to warm
    return refs
