"""A real Label Studio and our backend on loopback, wired together: `make demo` and the e2e tests.

This is the one place that knows how to start Label Studio 1.23 so that it accepts an ML backend on
loopback (``ML_BLOCK_LOCAL_IP=false``, ``SSRF_PROTECTION_ENABLED=false``), how to get an API token
from it (log in, create a personal access token, refresh it into a Bearer access token), and how
to create a project with generated images and connect the backend. `labelassist demo` runs it
until Ctrl-C; the end-to-end tests in tests/e2e reuse the same pieces.

Label Studio lives in its own virtual environment (its pins clash with ours): ``.venv-ls`` beside
this repository (``make .venv-ls/.installed``), or the executable named by ``LABEL_STUDIO_BIN``.
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]

#: Every tool of the README's example config, plus a classification: what the e2e tests exercise.
DEMO_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <KeyPointLabels name="kp" toName="image" smart="true">
    <Label value="Disc" smart="true" background="#ff7f0e"/><Label value="Square" smart="true" background="#1f77b4"/>
  </KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true">
    <Label value="Disc" background="#ff7f0e"/><Label value="Square" background="#1f77b4"/>
  </RectangleLabels>
  <BrushLabels name="mask" toName="image">
    <Label value="Disc" background="#ff7f0e"/><Label value="Square" background="#1f77b4"/>
  </BrushLabels>
  <PolygonLabels name="outline" toName="image">
    <Label value="Disc" background="#ff7f0e"/><Label value="Square" background="#1f77b4"/>
  </PolygonLabels>
  <Choices name="quality" toName="image"><Choice value="clean"/><Choice value="cluttered"/></Choices>
</View>"""

DEFAULT_USER = "demo@labelassist.local"
DEFAULT_PASSWORD = "labelassist-demo"


class StepFailed(AssertionError):
    """A call to Label Studio answered something else than expected; the message says which step
    and what Label Studio answered. An AssertionError so pytest shows it as a failed check."""


# --- synthetic scenes -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # HxWx3 uint8
    mask: np.ndarray  # HxW bool: the disc
    center: tuple[int, int]  # x, y in pixels
    radius: int

    def png(self) -> bytes:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(self.image).save(buf, format="PNG")
        return buf.getvalue()

    def center_percent(self) -> tuple[float, float]:
        h, w = self.mask.shape
        return self.center[0] * 100.0 / w, self.center[1] * 100.0 / h


def make_scene(seed: int, size: tuple[int, int] = (360, 480)) -> Scene:
    """A plain noisy background with one clear disc (the object) and a square of clutter."""
    import cv2

    rng = np.random.default_rng(seed)
    h, w = size
    background = rng.integers(40, 120, 3)
    img = np.clip(np.full((h, w, 3), background, np.float32) + rng.normal(0, 6, (h, w, 3)), 0, 255)
    img = img.astype(np.uint8)
    radius = int(rng.integers(min(h, w) // 8, min(h, w) // 5))
    cx = int(rng.integers(w // 2, w - radius - 10))
    cy = int(rng.integers(radius + 10, h - radius - 10))
    color = tuple(int(c) for c in rng.integers(170, 250, 3))
    cv2.circle(img, (cx, cy), radius, color, -1)
    side = int(rng.integers(30, 60))
    sx, sy = int(rng.integers(10, max(11, w // 2 - side - radius))), int(rng.integers(10, h - side - 10))
    cv2.rectangle(img, (sx, sy), (sx + side, sy + side), tuple(int(c) for c in rng.integers(0, 90, 3)), -1)
    mask = np.zeros((h, w), np.uint8)
    cv2.circle(mask, (cx, cy), radius, 1, -1)
    return Scene(img, mask.astype(bool), (cx, cy), radius)


# --- processes ------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def label_studio_bin() -> str:
    explicit = os.environ.get("LABEL_STUDIO_BIN")
    candidates = [explicit] if explicit else [str(ROOT / ".venv-ls" / "bin" / "label-studio"),
                                              shutil.which("label-studio")]
    for c in candidates:
        if c and Path(c).exists():
            return c
    raise FileNotFoundError("label-studio not found: run `make .venv-ls/.installed` (or set LABEL_STUDIO_BIN)")


def label_studio_env(data_dir: Path, username: str, password: str) -> dict[str, str]:
    """The environment Label Studio 1.23 needs to serve on loopback with an ML backend on loopback."""
    # Our own settings (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY...) must not leak into Label Studio,
    # which reads LABEL_STUDIO_<NAME> for its own settings.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LABEL_STUDIO_", "VIRTUAL_ENV", "PYTHONPATH", "DJANGO_"))}
    env.update(
        LABEL_STUDIO_BASE_DATA_DIR=str(data_dir),
        LABEL_STUDIO_USERNAME=username,
        LABEL_STUDIO_PASSWORD=password,
        LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK="true",
        ML_BLOCK_LOCAL_IP="false",  # else: "ML backend URL ... is a local address"
        SSRF_PROTECTION_ENABLED="false",  # else URL images on loopback are refused too
        LATEST_VERSION_CHECK="false",  # no call to pypi.org at start
        COLLECT_ANALYTICS="false",
        PYTHONUNBUFFERED="1",
    )
    return env


def stop_process(proc: subprocess.Popen | None, timeout: float = 15.0) -> None:
    """SIGTERM the process group started with start_new_session=True, SIGKILL it if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_http(url: str, proc: subprocess.Popen, what: str, timeout: float, log: Path | None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(url, timeout=3).status_code == 200:
                return
        except requests.RequestException:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            state = f"exited with {proc.returncode}" if proc.poll() is not None else f"not up after {timeout:.0f} s"
            stop_process(proc)
            raise RuntimeError(f"{what} {state}; its log ends with:\n{tail}")
        time.sleep(0.5)


@dataclass
class LabelStudio:
    """A Label Studio server we started, with an API session as its admin user."""

    url: str
    username: str
    password: str
    data_dir: Path
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    pat: str | None = None
    session: requests.Session = field(default_factory=requests.Session)

    @classmethod
    def start(cls, data_dir: Path, port: int | None = None, username: str = DEFAULT_USER,
              password: str = DEFAULT_PASSWORD, timeout: float = 300.0) -> "LabelStudio":
        data_dir = Path(data_dir).resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = data_dir / "label-studio.log"
        cmd = [label_studio_bin(), "start", "--no-browser", "--data-dir", str(data_dir),
               "--internal-host", "127.0.0.1", "--port", str(port), "--host", url,
               "--username", username, "--password", password]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, env=label_studio_env(data_dir, username, password), cwd=data_dir,
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        ls = cls(url, username, password, data_dir, proc, log_path)
        _wait_http(f"{url}/health", proc, "Label Studio", timeout, log_path)
        try:
            ls.login()
        except BaseException:
            ls.stop()
            raise
        return ls

    def stop(self) -> None:
        stop_process(self.proc)

    # --- auth ---
    def login(self) -> None:
        """Session login (for the token endpoint), then a personal access token -> Bearer access."""
        s = requests.Session()
        self.call("open the login page", "GET", "/user/login/", session=s)
        r = self.call("log in", "POST", "/user/login/", session=s, expect=(302,), allow_redirects=False,
                      data={"email": self.username, "password": self.password,
                            "csrfmiddlewaretoken": s.cookies.get("csrftoken", "")},
                      headers={"Referer": f"{self.url}/user/login/"})
        if "/user/login" in r.headers.get("location", ""):
            raise StepFailed(f"step 'log in': Label Studio sent us back to the login page ({self.username})")
        saved = self.data_dir / "labelassist-pat.txt"
        if saved.exists():
            self.pat = saved.read_text().strip()
        else:
            r = self.call("create a personal access token", "POST", "/api/token/", session=s,
                          headers={"X-CSRFToken": s.cookies.get("csrftoken", ""), "Referer": self.url})
            self.pat = r.json()["token"]
            saved.write_text(self.pat)
            saved.chmod(0o600)
        self.refresh_access()

    def refresh_access(self) -> None:
        r = self.call("refresh the personal access token", "POST", "/api/token/refresh/",
                      session=requests.Session(), json={"refresh": self.pat})
        self.session.headers["Authorization"] = f"Bearer {r.json()['access']}"

    def call(self, step: str, method: str, path: str, expect=(200, 201), session: requests.Session | None = None,
             timeout: float = 180.0, **kw) -> requests.Response:
        """One API call; anything but an expected status raises StepFailed naming the step and
        showing what Label Studio answered."""
        s = session or self.session
        try:
            r = s.request(method, f"{self.url}{path}", timeout=timeout, **kw)
        except requests.RequestException as exc:
            raise StepFailed(f"step {step!r}: {method} {path} failed: {exc!r}") from None
        if r.status_code == 401 and session is None and self.pat:  # the access token expired
            self.refresh_access()
            r = s.request(method, f"{self.url}{path}", timeout=timeout, **kw)
        if r.status_code not in expect:
            raise StepFailed(f"step {step!r}: {method} {path} answered HTTP {r.status_code} "
                             f"(expected {'/'.join(map(str, expect))}): {r.text[:2000]}")
        return r

    # --- project ---
    def create_project(self, title: str, label_config: str = DEMO_CONFIG, **extra) -> dict:
        return self.call("create the project", "POST", "/api/projects/",
                         json={"title": title, "label_config": label_config, **extra}).json()

    def upload_images(self, project: int, files: dict[str, bytes]) -> dict:
        # One form field per file: Label Studio reads request.FILES by key, so files sharing one
        # key ("file") collapse into one task.
        multipart = [(f"file{i}", (name, data, "image/png")) for i, (name, data) in enumerate(files.items())]
        return self.call("import uploaded images", "POST", f"/api/projects/{project}/import",
                         files=multipart).json()

    def import_tasks(self, project: int, tasks: list[dict]) -> dict:
        return self.call("import URL tasks", "POST", f"/api/projects/{project}/import", json=tasks).json()

    def tasks(self, project: int) -> list[dict]:
        r = self.call("list the tasks", "GET", "/api/tasks/", params={"project": project, "page_size": 1000})
        body = r.json()
        return body["tasks"] if isinstance(body, dict) else body

    def connect_backend(self, project: int, backend_url: str, title: str = "labelassist") -> dict:
        return self.call("connect the ML backend", "POST", "/api/ml/",
                         json={"url": backend_url, "project": project, "title": title,
                               "is_interactive": True}).json()


@dataclass
class Backend:
    url: str
    proc: subprocess.Popen
    log_path: Path

    @classmethod
    def start(cls, workdir: Path, label_studio: LabelStudio, port: int | None = None,
              timeout: float = 120.0, **settings: str) -> "Backend":
        """`python -m labelassist.cli serve` with settings from the environment, reading images from
        `label_studio` with its personal access token."""
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SAM_", "YOLO_", "SEGMENTER"))}
        env.update(HOST="127.0.0.1", PORT=str(port), LABEL_STUDIO_URL=label_studio.url,
                   LABEL_STUDIO_API_KEY=label_studio.pat or "", MEDIA_CACHE_DIR=str(workdir / "media-cache"),
                   SEGMENTER="grabcut", THREADS="4", PYTHONUNBUFFERED="1")
        env.update({k.upper(): str(v) for k, v in settings.items()})
        log_path = workdir / "labelassist.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "labelassist.cli", "serve"], cwd=workdir, env=env,
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        _wait_http(f"{url}/health", proc, "labelassist", timeout, log_path)
        return cls(url, proc, log_path)

    def stop(self) -> None:
        stop_process(self.proc)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def create_demo_project(ls: LabelStudio, backend_url: str, n_images: int = 6, title: str = "labelassist demo") -> dict:
    """A project with generated scenes uploaded to Label Studio, our backend connected as interactive."""
    project = ls.create_project(title)
    files = {f"scene-{i:02d}.png": make_scene(100 + i).png() for i in range(n_images)}
    ls.upload_images(project["id"], files)
    ml = ls.connect_backend(project["id"], backend_url)
    return {"project": project, "ml": ml}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="labelassist demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8080, help="Label Studio port (default 8080)")
    parser.add_argument("--backend-port", type=int, default=9090, help="labelassist port (default 9090)")
    parser.add_argument("--data-dir", type=Path, help="keep Label Studio's data here (default: a temporary dir)")
    parser.add_argument("--images", type=int, default=6, help="generated images in the demo project")
    args = parser.parse_args(argv)
    tmp = None
    if args.data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="labelassist-demo-")
        args.data_dir = Path(tmp.name)
    ls = backend = None

    def _stop(signum, frame):  # `kill` (SIGTERM) stops the servers too, like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)  # even where a non-interactive shell started us ignoring it
    try:
        print(f"starting Label Studio on http://127.0.0.1:{args.port} (data in {args.data_dir}) ...", flush=True)
        ls = LabelStudio.start(args.data_dir / "label-studio", args.port)
        backend = Backend.start(args.data_dir / "labelassist", ls, args.backend_port)
        made = create_demo_project(ls, backend.url, args.images)
        pid = made["project"]["id"]
        print(f"\nLabel Studio: {ls.url}/projects/{pid}/data\n"
              f"login:        {ls.username} / {ls.password}\n"
              f"backend:      {backend.url} (connected as an interactive model, state {made['ml'].get('state')})\n"
              f"logs:         {ls.log_path} and {backend.log_path}\n"
              "In a task: turn on Auto-Annotation (under the image), open the smart tools (the last button of "
              "the toolbar), pick the smart keypoint, choose the label 'Disc', click a disc.\n"
              "Ctrl-C stops both.", flush=True)
        while ls.proc.poll() is None and backend.proc.poll() is None:
            time.sleep(1)
        print("a server exited; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    finally:
        for server in (backend, ls):
            if server is not None:
                server.stop()
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
