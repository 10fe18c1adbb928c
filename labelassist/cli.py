"""The `labelassist` command."""
from __future__ import annotations

import argparse
import logging
import sys


def _serve(args: argparse.Namespace) -> int:
    from gunicorn.app.base import BaseApplication

    from .settings import get_settings

    settings = get_settings()
    host = args.host or settings.host
    port = args.port or settings.port

    class _App(BaseApplication):
        def load_config(self):
            # The same settings as `gunicorn -c python:labelassist.gunicorn_conf` (the image uses it).
            from . import gunicorn_conf

            for key, value in gunicorn_conf.options(settings).items():
                self.cfg.set(key, value)
            self.cfg.set("bind", f"{host}:{port}")

        def load(self):
            from .adapters.label_studio.app import create_app

            return create_app(settings)

    # Fail here, with a clear message, rather than in a gunicorn worker that will not boot.
    from .adapters.label_studio.app import build_prelabeler
    from .backends.detect import ModelLoadError

    try:
        # On the CPU: this process is gunicorn's master, and CUDA touched before the fork would be
        # unusable in the workers, which load the models for real.
        build_prelabeler(settings.model_copy(update={"device": "cpu"}))
    except ModelLoadError as exc:
        print(f"labelassist: cannot start: {exc}", file=sys.stderr)
        return 2
    print(f"labelassist: serving on http://{host}:{port}", flush=True)
    _App().run()
    return 0


def _worker(args: argparse.Namespace) -> int:
    from .jobs import work
    from .settings import get_settings

    settings = get_settings()
    if settings.redis_url is None:
        print("labelassist: `worker` needs REDIS_URL (the RQ queue the server enqueues training to)",
              file=sys.stderr)
        return 2
    print(f"labelassist: worker on queue {settings.queue_name!r}, registry {settings.registry_dir}", flush=True)
    work(settings.redis_url.get_secret_value(), settings.queue_name, burst=args.burst)
    return 0


def _start(args: argparse.Namespace) -> int:
    """`labelassist start`: what ROLE says this process runs (the container image's command)."""
    from .settings import get_settings

    if get_settings().role == "worker":
        return _worker(argparse.Namespace(burst=False))
    return _serve(argparse.Namespace(host=None, port=None))


def _models(args: argparse.Namespace) -> int:
    """`labelassist models`: the registry's versions; `labelassist rollback [VERSION]`."""
    import json

    from .backends.registry import ModelRegistry, RegistryError
    from .settings import get_settings

    registry = ModelRegistry(get_settings().registry_dir)
    if args.command == "rollback":
        try:
            version = registry.rollback(args.version)
        except RegistryError as exc:
            print(f"labelassist: rollback failed: {exc}", file=sys.stderr)
            return 1
        print(f"current model version: {version.version_id} (servers pick it up on their next request)")
        return 0
    current = registry.pointed()
    rows = [{"version": v.version_id, "status": v.status, "current": v.version_id == current,
             "intact": registry.is_valid(v), "parent": v.parent,
             "map50": v.metrics.get("map50"), "created": v.created} for v in registry.versions()]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            mark = "*" if r["current"] else " "
            map50 = "-" if r["map50"] is None else f"{r['map50']:.3f}"
            print(f"{mark} {r['version']}  {r['status']:<11} mAP50 {map50}  parent {r['parent'] or '-'}"
                  f"{'' if r['intact'] else '  CORRUPT'}")
    return 0


def _prelabel(args: argparse.Namespace) -> int:
    from .adapters.label_studio.bulk import main as bulk_main
    from .settings import get_settings

    return bulk_main(get_settings(), args.project, args.shard_size, args.local)


def _demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main(args.args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["evaluate"]:
        from .evaluate import main as evaluate_main

        return evaluate_main(argv[1:])
    parser = argparse.ArgumentParser(prog="labelassist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the Label Studio ML backend (gunicorn)")
    serve.add_argument("--host", help="bind address (default: HOST setting)")
    serve.add_argument("--port", type=int, help="port (default: PORT setting)")
    serve.set_defaults(func=_serve)
    worker = sub.add_parser("worker", help="run training jobs from the RQ queue (needs REDIS_URL)")
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    worker.set_defaults(func=_worker)
    start = sub.add_parser("start", help="run what ROLE says: `serve` (all, interactive, prelabel) or `worker`")
    start.set_defaults(func=_start)
    prelabel = sub.add_parser("prelabel", help="pre-label every task of a Label Studio project in bulk "
                                               "(sharded over RQ workers when REDIS_URL is set)")
    prelabel.add_argument("--project", type=int, required=True, help="Label Studio project id")
    prelabel.add_argument("--shard-size", type=int, default=200, help="tasks per job (default 200)")
    prelabel.add_argument("--local", action="store_true", help="run here even when REDIS_URL is set")
    prelabel.set_defaults(func=_prelabel)
    models = sub.add_parser("models", help="list the model registry's versions (* = served)")
    models.add_argument("--json", action="store_true")
    models.set_defaults(func=_models)
    rollback = sub.add_parser("rollback", help="serve an earlier model version (default: the one before)")
    rollback.add_argument("version", nargs="?", help="version id, e.g. v0003")
    rollback.set_defaults(func=_models)
    sub.add_parser("evaluate", help="score a detector and its uncertainty on a labelled data set "
                                    "(see: labelassist evaluate --help)")
    demo = sub.add_parser("demo", add_help=False,
                          help="start Label Studio (from .venv-ls) and the backend with a demo project")
    demo.add_argument("args", nargs=argparse.REMAINDER)
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    from .settings import get_settings

    logging.basicConfig(level=get_settings().log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
