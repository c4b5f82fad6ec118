"""``python -m musetalk_worker.serve --models DIR``: the self-hosted HTTP API (see the README's "Run it yourself")."""

from __future__ import annotations

# Before anything can import torch: it reads this when it loads.
from ..device import enable_mps_fallback

enable_mps_fallback()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional, Sequence  # noqa: E402

from ..options import WorkerSettings  # noqa: E402
from .settings import TOKEN_ENV, ServeOptions  # noqa: E402

logger = logging.getLogger("musetalk_worker.serve")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m musetalk_worker.serve",
                                description="Serve lip-sync over HTTP: POST /generate with a face and a speech file.")
    p.add_argument("--models", required=True, type=Path, help="models folder (standard layout)")
    p.add_argument("--host", default=ServeOptions.host,
                   help=f"address to listen on ({ServeOptions.host}); any other than loopback needs --token")
    p.add_argument("--port", type=int, default=ServeOptions.port, help=f"TCP port ({ServeOptions.port})")
    p.add_argument("--landmarks", choices=("auto", "dwpose", "dlib"), default="auto",
                   help="face landmarks (auto: dwpose where mmpose and its weights are there, else dlib)")
    p.add_argument("--device", choices=("auto", "cuda", "mps", "cpu"), default="auto",
                   help="auto picks CUDA, then Apple's MPS, then the CPU")
    p.add_argument("--token", default=None,
                   help=f"require 'Authorization: Bearer <token>' on every request (default: ${TOKEN_ENV})")
    p.add_argument("--queue", type=int, default=ServeOptions.queue,
                   help=f"requests that may wait behind the running job before 429 ({ServeOptions.queue})")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Serves until stopped; returns the exit code (1: the models did not load, 2: refused to start)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = ServeOptions(host=args.host, port=args.port, token=args.token or os.environ.get(TOKEN_ENV) or None,
                           queue=args.queue)
    problem = options.bind_problem() or (None if args.queue >= 0 else "--queue must be 0 or more.")
    if problem is None:
        try:
            # The worker's limits and paths from its environment variables; the server's own choices on top.
            # No bucket: the video always comes back in the response.
            settings = dataclasses.replace(WorkerSettings.from_env(), models_dir=args.models.resolve(),
                                           device=args.device, landmarks=args.landmarks, bucket_name=None)
        except ValueError as err:
            problem = str(err)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2

    import uvicorn

    from .app import create_app

    def stop() -> None:
        server.should_exit = True

    app = create_app(settings, options, stop)
    # log_config=None: uvicorn logs through the root logger set up above; log_level, because importing
    # runpod (with the worker) turns uvicorn's logger down to WARNING, hiding its start and access lines.
    server = uvicorn.Server(uvicorn.Config(app, host=options.host, port=options.port, log_config=None,
                                           log_level="info"))
    server.run()
    failure = app.state.server.load_failure
    if failure:
        print(f"error (models_missing): {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
