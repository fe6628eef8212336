"""``slimtune serve``: the OpenAI-compatible HTTP server over one base and a delta store."""

from __future__ import annotations

import argparse

from ..errors import UserInputError
from .common import S, add_model_args, add_quantize_arg, device_of


def serve_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the base and the store's deltas over an OpenAI-compatible HTTP API",
        description="One base in memory; each request's `model` picks what answers it: "
        "'base', a store version id or a tag (read at request time, so `delta tag` and "
        "`delta rollback` take effect without a restart). Needs the serve extra: "
        "pip install 'slimtune[serve]'.",
    )
    add_model_args(p)
    p.add_argument("--store", default=S, help="delta store (default: the usual place)")
    add_quantize_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--max-batch", type=int, default=8, help="requests of one delta run together (default 8)"
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=128,
        help="completion tokens when a request does not say (default 128)",
    )


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise UserInputError(
            f"slimtune serve needs {e.name}: pip install 'slimtune[serve]'"
        ) from None
    if args.max_batch < 1 or args.max_tokens < 1:
        raise UserInputError("--max-batch and --max-tokens must be >= 1")
    from ..delta import DeltaSwitcher
    from ..delta.store import DeltaStore
    from ..log import info
    from ..model.loading import load_model
    from ..serve.app import create_app
    from ..serve.engine import Engine

    model = getattr(args, "model", None) or "default"
    loaded = load_model(model, device=device_of(args), quantize=getattr(args, "quantize", "none"))
    store = DeltaStore(getattr(args, "store", None))
    engine = Engine(DeltaSwitcher(loaded, store), max_batch=args.max_batch).start()
    app = create_app(engine, default_max_tokens=args.max_tokens)
    info(f"serving {loaded.name} and the deltas of {store.root} on http://{args.host}:{args.port}")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.stop()
    return 0
