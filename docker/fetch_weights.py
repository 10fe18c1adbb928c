"""Fetch model weights while the image is built (never when it runs), and name them for the settings.

    python fetch_weights.py --dest DIR --env-file FILE [--sam-model-type vit_b] \
        SAM_CHECKPOINT=URL YOLO_WEIGHTS=URL

Each NAME=URL with a non-empty URL is downloaded into DIR, and FILE gets the line NAME=<path>
(plus SAM_MODEL_TYPE when a SAM checkpoint is fetched). An empty URL fetches nothing and writes
nothing: the setting keeps its default. The image installs FILE as /app/.env, which the settings
read from the working directory; the container's environment still wins over it.

A URL may end with `#sha256=<hex>`: the download must have that digest, or the build fails.
http(s) and file URLs are accepted. Standard library only: it runs before anything is installed.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

# The suffix each setting's loader expects (ultralytics refuses anything but .pt).
SUFFIXES = {"SAM_CHECKPOINT": ".pth", "YOLO_WEIGHTS": ".pt"}


class FetchError(RuntimeError):
    pass


def target_name(name: str, url: str) -> str:
    """The file name to save URL as: the URL's own (query and fragment dropped), with the suffix
    the setting needs."""
    base = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name or name.lower()
    suffix = SUFFIXES.get(name)
    if suffix and not base.endswith(suffix):
        base += suffix
    return base


def fetch(url: str, dest: Path, timeout: float = 60.0) -> Path:
    """Download url into dest (atomically: a partial download never has the final name)."""
    url, _, fragment = url.partition("#")
    expected = None
    if fragment:
        key, _, value = fragment.partition("=")
        if key != "sha256" or len(value) != 64:
            raise FetchError(f"unsupported URL fragment #{fragment} (only #sha256=<64 hex digits>)")
        expected = value.lower()
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https", "file"):
        raise FetchError(f"{url}: only http(s) and file URLs are fetched")
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310
            while chunk := resp.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        size = os.path.getsize(tmp)
        if size == 0:
            raise FetchError(f"{url}: empty download")
        if expected and digest.hexdigest() != expected:
            raise FetchError(f"{url}: sha256 {digest.hexdigest()} is not the expected {expected}")
        os.replace(tmp, dest)
    except (OSError, ValueError) as exc:  # URLError and HTTPError are OSErrors
        raise FetchError(f"{url}: {exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    os.chmod(dest, 0o644)
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, required=True, help="folder the weights are saved in")
    ap.add_argument("--env-file", type=Path, required=True, help="dotenv file naming them")
    ap.add_argument("--sam-model-type", default="vit_b", help="SAM_MODEL_TYPE of the SAM checkpoint")
    ap.add_argument("pairs", nargs="*", metavar="NAME=URL")
    args = ap.parse_args(argv)
    lines = []
    try:
        for pair in args.pairs:
            name, sep, url = pair.partition("=")
            if not sep or name not in SUFFIXES:
                raise FetchError(f"expected NAME=URL with NAME one of {', '.join(SUFFIXES)}: {pair!r}")
            if not url.strip():
                continue
            path = fetch(url.strip(), args.dest / target_name(name, url.strip()))
            print(f"fetch_weights: {name} <- {url.split('#')[0]} ({path.stat().st_size} bytes) at {path}")
            lines.append(f"{name}={path}")
            if name == "SAM_CHECKPOINT":
                lines.append(f"SAM_MODEL_TYPE={args.sam_model_type}")
    except FetchError as exc:
        print(f"fetch_weights: {exc}", file=sys.stderr)
        return 1
    args.env_file.parent.mkdir(parents=True, exist_ok=True)
    header = "# Weights baked into the image at build time (docker/fetch_weights.py).\n"
    args.env_file.write_text(header + "".join(f"{line}\n" for line in lines))
    args.dest.mkdir(parents=True, exist_ok=True)
    if not lines:
        print("fetch_weights: no weights URL given; none baked in")
    return 0


if __name__ == "__main__":
    sys.exit(main())
