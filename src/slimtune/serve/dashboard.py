"""The web dashboard: the store, each version's run and SALF analysis, A/B results, live
serving metrics and a playground, on one page served at ``/``.

The page (``static/``: HTML, CSS and plain JavaScript, no build step, nothing fetched from
the network) draws its tables and plots from the JSON routes below, which hand out what
the CLI writes: the store's index and manifests (each version's config, metrics, loss curve
and, for ``--freeze auto`` runs, the SALF analysis), the run folder a manifest names (its
report and plots, when it is on this machine), ``slimtune analyze`` and ``ab --output``
files under ``--runs``, and the request log for live A/B results.

Read-only unless started with ``--allow-writes``: moving a tag, rolling one back and
removing a version then go through the store's own methods (the CLI's), and are refused
with 403 otherwise. Those POSTs must carry the ``x-slimtune-write`` header, which the page
sends and which another site's page cannot make a browser send (no cross-site request
forgery); bound to a loopback address, the app answers only requests whose Host is one
(no DNS rebinding).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel

from ..errors import DeltaError, UserInputError
from ..fileio import sha256_file

# files of a run folder the page may show (nothing else is served from it)
RUN_FILES = {
    "loss.png": "image/png",
    "expert_usage.png": "image/png",
    "analysis.png": "image/png",
    "sweep.png": "image/png",
    "report.md": "text/markdown; charset=utf-8",
}
# the metrics the versions table shows, in its order
TABLE_METRICS = (
    "eval_accuracy",
    "eval_loss",
    "trainable_params",
    "train_time_s",
    "tokens_per_s",
    "peak_memory_bytes",
)


WRITE_HEADER = "x-slimtune-write"
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def guard_loopback(app: FastAPI, host: str) -> None:
    """Bound to a loopback address, answer only requests addressed to one: a page of another
    site whose name was made to resolve to 127.0.0.1 (DNS rebinding) gets 400."""
    if host in LOOPBACK:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost", "[::1]"])


class TagMove(BaseModel):
    name: str
    version: str


def _finite(value: Any) -> Any:
    """JSON has no NaN: non-finite floats (a diverged loss) go out as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _refused(status: int, message: str) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": None, "code": None}},
        status_code=status,
    )


def add_dashboard(
    app: FastAPI,
    store,
    *,
    writable: bool = False,
    runs: Path | None = None,
    log_path: Path | None = None,
    serving: Any = None,
    model_name: str | None = None,
) -> None:
    """Mount the page and its JSON routes on ``app``. ``serving``: the serve app's metrics
    (None for ``slimtune dashboard``, which loads no model: no playground then)."""
    static = resources.files("slimtune.serve") / "static"

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse((static / "index.html").read_text(encoding="utf-8"))

    @app.get("/static/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        types = {".js": "text/javascript", ".css": "text/css"}
        kind = types.get(Path(name).suffix)
        if kind is None or "/" in name or name.startswith("."):
            return _refused(404, f"no asset {name!r}")
        file = static / name
        if not file.is_file():
            return _refused(404, f"no asset {name!r}")
        return Response(file.read_text(encoding="utf-8"), media_type=kind)

    @app.get("/api/info")
    async def info() -> dict:
        return {
            "store": str(store.root),
            "writable": writable,
            "model": model_name,
            "playground": serving is not None,
            "log": str(log_path) if log_path else None,
            "runs": str(runs) if runs else None,
        }

    def versions() -> dict:
        tags = store.tags()
        rows = []
        for v in store.list():
            metrics = {}
            # a folder gone missing: the row still shows, without metrics
            with contextlib.suppress(DeltaError, OSError, ValueError):
                metrics = v.manifest().get("metrics") or {}
            rows.append(
                {
                    "id": v.id,
                    "parent": v.parent,
                    "method": v.method,
                    "created": v.created,
                    "bytes": v.bytes,
                    "note": v.note,
                    "tags": sorted(t for t, vid in tags.items() if vid == v.id),
                    "metrics": {k: metrics.get(k) for k in TABLE_METRICS},
                }
            )
        return _finite(
            {
                "versions": rows,
                "tags": tags,
                "tag_history": store.tag_history(),
                "splits": store.splits(),
            }
        )

    @app.get("/api/versions")
    async def list_versions() -> dict:
        return await run_in_threadpool(versions)

    def version(ref: str) -> dict:
        v = store.resolve(ref, check=False)
        out = store.describe(v)
        m = v.manifest()
        out["metrics"] = {**(out.get("metrics") or {}), "delta_bytes": v.bytes}
        out.update(
            training=m.get("training"),
            curve=m.get("curve"),
            auto_freeze=m.get("auto_freeze"),
            files=m.get("files"),
            run=_run_files(_run_folder(v, m)),
        )
        return _finite(out)

    @app.get("/api/versions/{ref}")
    async def show(ref: str):
        try:
            return await run_in_threadpool(version, ref)
        except (DeltaError, UserInputError) as e:
            return _refused(404, str(e))

    @app.get("/api/versions/{ref}/run/{name}")
    async def run_file(ref: str, name: str):
        try:
            v = await run_in_threadpool(store.resolve, ref, check=False)
        except (DeltaError, UserInputError) as e:
            return _refused(404, str(e))
        folder = await run_in_threadpool(_run_folder, v)
        if name not in RUN_FILES or folder is None or not (folder / name).is_file():
            return _refused(404, f"{ref}'s run has no {name} here")
        return FileResponse(folder / name, media_type=RUN_FILES[name])

    @app.get("/api/analyses")
    async def analyses() -> dict:
        return {"analyses": await run_in_threadpool(_found, runs, _is_analysis)}

    @app.get("/api/ab")
    async def ab() -> dict:
        offline = await run_in_threadpool(_found, runs, _is_ab)
        live = await run_in_threadpool(_live_ab, log_path)
        return _finite({"offline": offline, "live": live})

    @app.get("/api/serving")
    async def live_metrics() -> dict:
        return {"available": serving is not None, "deltas": _serving(serving)}

    async def act(request: Request, fn) -> JSONResponse:
        if request.headers.get(WRITE_HEADER) != "1":
            return _refused(403, f"a change to the store needs the {WRITE_HEADER}: 1 header")
        if not writable:
            return _refused(
                403,
                "this dashboard was started read-only; restart it with --allow-writes to "
                "move tags, roll back or remove versions",
            )
        try:
            return JSONResponse({"ok": True, **(await run_in_threadpool(fn))})
        except (DeltaError, UserInputError) as e:
            return _refused(400, str(e))

    @app.post("/api/tags")
    async def move_tag(body: TagMove, request: Request) -> JSONResponse:
        def move() -> dict:
            old, new = store.tag(body.name, body.version)
            return {"tag": body.name, "from": old, "to": new}

        return await act(request, move)

    @app.post("/api/tags/{name}/rollback")
    async def rollback(name: str, request: Request) -> JSONResponse:
        def back() -> dict:
            old, new = store.rollback(name)
            return {"tag": name, "from": old, "to": new}

        return await act(request, back)

    @app.post("/api/versions/{ref}/rm")
    async def remove(ref: str, request: Request) -> JSONResponse:
        return await act(request, lambda: {"removed": store.remove(ref)})


def _run_folder(version, manifest: dict | None = None) -> Path | None:
    """The run folder the version's manifest (read here unless given) names, if it is on
    this machine and still holds this version's run (its delta's manifest is the stored
    one: a later run into the same folder is another version's)."""
    try:
        manifest = manifest if manifest is not None else version.manifest()
    except (DeltaError, OSError, ValueError):
        return None
    out = (manifest.get("training") or {}).get("output_dir")
    folder = Path(out).expanduser() if out else None
    if folder is None or not folder.is_dir():
        return None
    try:
        held = sha256_file(folder / "delta" / "manifest.json")
    except OSError:
        return None
    return folder if held == version.manifest_sha256 else None


def _run_files(folder: Path | None) -> dict:
    if folder is None:
        return {"folder": None, "files": [], "report": None}
    files = [n for n in RUN_FILES if n.endswith(".png") and (folder / n).is_file()]
    report = folder / "report.md"
    text = report.read_text(encoding="utf-8", errors="replace") if report.is_file() else None
    return {"folder": str(folder), "files": files, "report": text}


def _is_analysis(data: dict) -> bool:
    return {"spaces", "gain", "fit", "num_layers"} <= set(data)


def _is_ab(data: dict) -> bool:
    return {"A", "B", "bootstrap", "winner"} <= set(data)


def _found(root: Path | None, kind, limit: int = 200, depth: int = 4) -> list[dict]:
    """JSON files under ``root`` (``depth`` folders down at most, run folders' deltas and
    checkpoints skipped) that ``kind`` recognises."""
    if root is None or not root.is_dir():
        return []
    out: list[dict] = []
    for folder, dirs, files in os.walk(root):
        rel = Path(folder).relative_to(root)
        dirs[:] = sorted(d for d in dirs if len(rel.parts) < depth and d not in SKIP_DIRS)
        for name in sorted(f for f in files if f.endswith(".json")):
            path = Path(folder) / name
            try:
                if path.stat().st_size > 5_000_000:
                    continue
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and kind(data):
                out.append({"path": str(path.relative_to(root)), **_finite(data)})
                if len(out) == limit:
                    return out
    return out


SKIP_DIRS = {"delta", "checkpoint", "checkpoint.old", "logs"}


def _live_ab(log_path: Path | None) -> list[dict]:
    """One comparison per split seen in the log (its two most rated versions)."""
    if log_path is None or not Path(log_path).is_file():
        return []
    from ..eval.abtest import ab_from_log
    from .traffic import read_log

    try:
        requests, _ = read_log(log_path)
    except UserInputError as e:  # a damaged log: said, the offline results still shown
        return [{"split": None, "error": str(e)}]
    out = []
    for split in sorted({r.split for r in requests if r.split}):
        try:
            out.append(ab_from_log(requests, split=split))
        except ValueError as e:
            out.append({"split": split, "error": str(e)})
    return out


def _serving(metrics) -> dict[str, dict[str, float]]:
    """Per served version: requests, errors, tokens, mean latency and last tokens/s, read
    from the serve app's Prometheus registry."""
    if metrics is None:
        return {}
    out: dict[str, dict[str, float]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            delta = sample.labels.get("delta")
            if delta is None:
                continue
            row = out.setdefault(delta, {})
            name = sample.name
            if name == "slimtune_requests_total":
                key = "requests" if sample.labels.get("status") == "ok" else "errors"
                row[key] = row.get(key, 0) + sample.value
            elif name == "slimtune_generated_tokens_total":
                row["tokens"] = sample.value
            elif name == "slimtune_tokens_per_second":
                row["tokens_per_s"] = sample.value
            elif name == "slimtune_request_latency_seconds_sum":
                row["latency_sum"] = sample.value
            elif name == "slimtune_request_latency_seconds_count":
                row["latency_count"] = sample.value
    for row in out.values():
        count = row.pop("latency_count", 0)
        total = row.pop("latency_sum", 0)
        row["latency_mean_s"] = total / count if count else None
    return out
