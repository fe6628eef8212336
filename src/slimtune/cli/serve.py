"""``slimtune serve``: the OpenAI-compatible HTTP server over one base and a delta store."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserInputError
from .common import S, add_model_args, add_quantize_arg, device_of


def serve_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the base and the store's deltas over an OpenAI-compatible HTTP API",
        description="One base in memory; each request's `model` picks what answers it: "
        "'base', a store version id, a tag or an A/B split (read at request time, so `delta "
        "tag`, `delta rollback` and `delta split` take effect without a restart). Needs the "
        "serve extra: "
        "pip install 'slimtune[serve]'.",
    )
    add_model_args(p)
    add_quantize_arg(p)
    add_server_args(p)
    p.add_argument(
        "--max-batch",
        type=int,
        default=8,
        help="requests that run together in one batch: of one delta, or of the base and the "
        "loaded LoRA deltas (--adapters). Default 8",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=128,
        help="completion tokens when a request does not say (default 128)",
    )
    p.add_argument(
        "--adapters",
        type=int,
        default=16,
        help="LoRA deltas kept loaded side by side, whose requests share batches "
        "(default 16; 0: each delta is switched on for batches of its own)",
    )
    p.add_argument(
        "--split",
        action="append",
        default=[],
        metavar="[NAME:]ARM=W,ARM=W",
        help="A/B traffic: requests for NAME (default: the first arm) go to each arm in "
        "proportion to its weight, the same arm for the same `user`; e.g. prod=90,v5=10. "
        "Repeatable",
    )
    p.add_argument(
        "--log",
        help="append every request and every outcome posted to /v1/outcomes to this JSON "
        "Lines file (read by `slimtune ab --log`)",
    )


def add_server_args(p) -> None:
    """What serve and dashboard both take: the store, the address, the dashboard's mode."""
    p.add_argument("--store", default=S, help="delta store (default: the usual place)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--allow-writes",
        action="store_true",
        help="let the dashboard at / move and roll back tags and remove versions "
        "(default: read-only)",
    )
    p.add_argument(
        "--runs",
        help="a folder the dashboard searches for `slimtune analyze` outputs and "
        "`slimtune ab --output` results",
    )


def dashboard_parser(sub) -> None:
    p = sub.add_parser(
        "dashboard",
        help="the web dashboard over a delta store, without a model (read-only by default)",
        description="Serves the dashboard's page at / over a store: versions, lineage, "
        "tags, comparisons, each version's run and SALF analysis, A/B results. No model is "
        "loaded, so no playground: `slimtune serve` serves the same page with one. Needs "
        "the serve extra: pip install 'slimtune[serve]'.",
    )
    add_server_args(p)
    p.add_argument("--log", help="a request log of `slimtune serve --log`, for live A/B results")


def _server_stack():
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise UserInputError(
            f"slimtune serve needs {e.name}: pip install 'slimtune[serve]'"
        ) from None
    return uvicorn


def _request_log(path: str):
    """``--log``'s file, opened for appending; a folder or an unwritable path is named."""
    from ..serve.traffic import RequestLog

    try:
        return RequestLog(path)
    except OSError as e:
        raise UserInputError(f"--log {path}: cannot append to it ({e.strerror})") from None


def _runs(args) -> Path | None:
    if not args.runs:
        return None
    runs = Path(args.runs).expanduser()
    if not runs.is_dir():
        raise UserInputError(f"--runs {args.runs}: no such folder")
    return runs


def cmd_dashboard(args: argparse.Namespace) -> int:
    uvicorn = _server_stack()
    from fastapi import FastAPI

    from ..delta.store import DeltaStore
    from ..log import info
    from ..serve.dashboard import add_dashboard, guard_loopback

    store = DeltaStore(getattr(args, "store", None))
    app = FastAPI(title="slimtune dashboard")
    guard_loopback(app, args.host)
    log = Path(args.log).expanduser() if args.log else None
    add_dashboard(app, store, writable=args.allow_writes, runs=_runs(args), log_path=log)
    mode = "read-write" if args.allow_writes else "read-only"
    info(f"dashboard of {store.root} ({mode}) on http://{args.host}:{args.port}")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    uvicorn = _server_stack()
    if args.max_batch < 1 or args.max_tokens < 1:
        raise UserInputError("--max-batch and --max-tokens must be >= 1")
    if args.adapters < 0:
        raise UserInputError("--adapters must be >= 0")
    from ..serve.traffic import parse_splits

    splits = parse_splits(args.split)
    from ..delta import DeltaSwitcher
    from ..delta.store import DeltaStore
    from ..log import info
    from ..model.loading import load_model
    from ..serve.app import create_app
    from ..serve.dashboard import add_dashboard, guard_loopback
    from ..serve.engine import Engine, UnknownModel

    # a bad store or log path fails before the model loads
    store = DeltaStore(getattr(args, "store", None))
    log = _request_log(args.log) if args.log else None
    model = getattr(args, "model", None) or "default"
    loaded = load_model(model, device=device_of(args), quantize=getattr(args, "quantize", "none"))
    engine = Engine(DeltaSwitcher(loaded, store), max_batch=args.max_batch, adapters=args.adapters)
    for split in splits.values():  # every arm must serve something now (a typo is not a 404)
        for arm, _ in split.arms:
            try:
                engine.resolve(arm)
            except UnknownModel as e:
                raise UserInputError(f"--split {split}: arm {arm!r}: {e}") from None
    runs = _runs(args)
    app = create_app(engine.start(), default_max_tokens=args.max_tokens, splits=splits, log=log)
    guard_loopback(app, args.host)
    add_dashboard(
        app,
        store,
        writable=args.allow_writes,
        runs=runs,
        log_path=log.path if log else None,
        serving=app.state.metrics,
        model_name=loaded.name,
    )
    info(f"serving {loaded.name} and the deltas of {store.root} on http://{args.host}:{args.port}")
    for split in splits.values():
        info(f"split {split}")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.stop()
        if log is not None:
            log.close()
    return 0
