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
            self.cfg.set("bind", f"{host}:{port}")
            self.cfg.set("workers", settings.workers)
            self.cfg.set("threads", settings.threads)
            self.cfg.set("worker_class", "gthread")
            # Label Studio waits up to 100 s for a predict; an image encode on CPU must fit.
            self.cfg.set("timeout", 120)
            self.cfg.set("loglevel", settings.log_level.lower())
            self.cfg.set("accesslog", "-")

        def load(self):
            from .adapters.label_studio.app import create_app

            return create_app(settings)

    # Fail here, with a clear message, rather than in a gunicorn worker that will not boot.
    from .adapters.label_studio.app import build_prelabeler
    from .backends.detect import ModelLoadError

    try:
        build_prelabeler(settings)
    except ModelLoadError as exc:
        print(f"labelassist: cannot start: {exc}", file=sys.stderr)
        return 2
    print(f"labelassist: serving on http://{host}:{port}", flush=True)
    _App().run()
    return 0


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
