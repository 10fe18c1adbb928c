"""All configuration, read once from the environment (and a `.env` file).

This is the only place that reads the environment. Every field is documented in the README.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # --- server ---
    host: str = Field("127.0.0.1", description="Address `labelassist serve` binds to.")
    port: int = Field(9090, description="Port `labelassist serve` listens on.")
    workers: int = Field(1, ge=1, description="gunicorn worker processes (each holds its own models).")
    threads: int = Field(8, ge=1, description="Threads per worker; clicks are served concurrently.")
    log_level: str = Field("INFO", description="Python log level.")
    basic_auth_user: str | None = Field(None, description="If set with the password, every route but /health needs HTTP basic auth.")
    basic_auth_pass: SecretStr | None = Field(None, description="Basic-auth password.")
    max_request_bytes: int = Field(16 * 1024 * 1024, description="Largest accepted request body.")

    # --- segmenter ---
    segmenter: Literal["auto", "grabcut", "sam"] = Field(
        "auto", description="auto: SAM when SAM_CHECKPOINT is set, else the classical grabcut segmenter.")
    sam_checkpoint: Path | None = Field(None, description="Local path of a segment-anything checkpoint (.pth).")
    sam_model_type: Literal["vit_b", "vit_l", "vit_h"] = Field("vit_b", description="Architecture of SAM_CHECKPOINT.")
    device: str = Field("auto", description="torch device for neural models: auto, cpu, cuda, cuda:1 ...")
    embedding_cache_bytes: int = Field(1024 * 1024 * 1024, description="Byte bound of the in-process embedding cache.")
    embedding_cache_fp16: bool = Field(True, description="Store neural embeddings as float16 (half the memory).")
    warm_cache_on_predict: bool = Field(True, description="Batch /predict and TASKS_CREATED webhooks compute embeddings in the background.")
    polygon_tolerance: float = Field(1.0, ge=0, description="Polygon simplification tolerance, in pixels.")

    # --- detector (pre-labels) ---
    models_dir: Path = Field(Path("models"), description="Folder holding detector weights; a control's `model_path` attribute is resolved inside it, never outside.")
    yolo_weights: Path | None = Field(None, description="Default detector weights (.pt, ultralytics), inside MODELS_DIR or absolute; unset: the detector is untrained and pre-labels nothing.")
    detect_conf: float = Field(0.25, ge=0, le=1, description="Detector confidence threshold for pre-labels.")
    detect_batch: int = Field(16, ge=1, description="Images per detector batch when /predict carries many tasks.")
    uncertainty_tta: str = Field("hflip,scale0.8", description="Test-time views whose disagreement feeds the uncertainty score (comma-separated: hflip, scaleF); empty for none.")
    uncertainty_low_conf: float = Field(0.05, ge=0, le=1, description="Detections between this and DETECT_CONF count as possible misses in the task score.")

    # --- training (the Train button) ---
    registry_dir: Path = Field(Path("models/registry"), description="Versioned model store (a shared volume for several replicas); its current version is served over YOLO_WEIGHTS.")
    train_epochs: int = Field(30, ge=1, description="Epochs per training job.")
    train_imgsz: int = Field(320, ge=32, description="Training and validation image size.")
    train_min_images: int = Field(4, ge=2, description="Fewest annotated images a training job accepts.")
    train_after_annotations: int = Field(0, ge=0, description="Start training after this many ANNOTATION_CREATED/UPDATED/DELETED events per project; 0: off.")
    webhook_secret: SecretStr | None = Field(None, description="Shared secret that annotation webhooks must carry (?secret=... in the webhook URL or an X-Labelassist-Secret header).")
    train_export_attempts: int = Field(4, ge=1, description="Attempts to pull annotations from Label Studio before a training job fails.")
    train_export_backoff: float = Field(2.0, ge=0, description="Seconds before the first retry of a failed export; doubles each time.")

    # --- jobs and scale-out ---
    role: Literal["all", "interactive", "prelabel", "worker"] = Field(
        "all", description="What `labelassist start` (the container's command) runs. all: the Label Studio "
        "backend, clicks and pre-labels; interactive: the backend for clicks only (no detector weights "
        "loaded; a batch /predict is a 409); prelabel: the backend for pre-labels and training only "
        "(classical segmenter, no SAM loaded, no embedding warm-up; a click is a 409); worker: "
        "`labelassist worker` (RQ training jobs, needs REDIS_URL).")
    redis_url: SecretStr | None = Field(None, description="redis://host:6379/0: training jobs go to an RQ queue that `labelassist worker` processes run (any machine sharing REGISTRY_DIR); unset: one in-process worker thread.")
    queue_name: str = Field("labelassist", description="RQ queue the server enqueues to and `labelassist worker` listens on.")
    job_timeout: int = Field(6 * 3600, ge=60, description="Seconds a queued job may run before RQ stops it.")

    # --- shared embedding cache (with REDIS_URL) ---
    shared_cache: bool = Field(True, description="With REDIS_URL: share image embeddings between replicas through Redis (a second level behind the in-process cache).")
    shared_cache_ttl: int = Field(3600, ge=1, description="Seconds an embedding stays in the shared cache after its last use.")
    shared_cache_max_bytes: int = Field(1024 * 1024 * 1024, ge=0, description="Byte bound of the shared cache in Redis (compressed values, all replicas together); least recently used embeddings go first, larger ones are not stored.")
    shared_cache_wait: float = Field(30.0, ge=0, description="Seconds a replica waits for an embedding another replica is computing before computing it itself.")

    # --- Label Studio and media ---
    label_studio_url: str | None = Field(None, description="Base URL of Label Studio, e.g. http://localhost:8080.")
    label_studio_api_key: SecretStr | None = Field(None, description="Personal access token (JWT refresh token) or legacy token.")
    local_files_document_root: Path | None = Field(None, description="Mounted LOCAL_FILES_DOCUMENT_ROOT: read /data/local-files/ from disk.")
    allowed_media_hosts: str = Field("*", description="Comma-separated hosts that plain http(s) media may come from; * for any.")
    media_cache_dir: Path = Field(Path.home() / ".cache" / "labelassist" / "media", description="On-disk download cache.")
    media_cache_bytes: int = Field(2 * 1024 * 1024 * 1024, description="Byte bound of the download cache.")
    media_timeout: float = Field(30.0, gt=0, description="Seconds to wait for one media download.")
    max_image_bytes: int = Field(64 * 1024 * 1024, description="Largest image file accepted.")
    max_image_pixels: int = Field(100_000_000, description="Largest image (width x height) accepted; guards against decompression bombs.")

    @property
    def basic_auth_enabled(self) -> bool:
        return bool(self.basic_auth_user and self.basic_auth_pass)

    def allowed_hosts(self) -> set[str] | None:
        """None means any host."""
        hosts = {h.strip().lower() for h in self.allowed_media_hosts.split(",") if h.strip()}
        return None if "*" in hosts else hosts


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
