"""slimtune serve under load: throughput and latency for the base, one delta, and several
LoRA deltas mixed, in one run; then how long a moved tag takes to serve its new version.

    python benchmarks/serve_load.py --device cpu --requests 32 --clients 8 --deltas 4

Builds ``--deltas`` LoRA deltas of the default model (seeded random adapters on the top two
layers, rank 4: the cost of serving does not depend on what they learned) in a temporary
store, starts ``slimtune serve`` on it, and for each scenario sends ``--requests`` chat
requests from ``--clients`` concurrent clients (``max_tokens`` fixed, greedy):

* ``base``: every request asks for the base;
* ``1 delta``: every request asks for the first delta;
* ``N deltas mixed``: requests cycle through the N deltas; the server runs them in one
  batch, each row through its own adapter (the bank);
* ``N deltas mixed, --adapters 0``: the same against a second server without the bank,
  which groups requests per delta and switches between groups (the peer: one delta per
  batch, as before the bank).

Tag switch: 4 clients ask for ``prod`` in a loop (streaming); the tag is moved between two
deltas ``--moves`` times; reported is the time from the move (the store's write returning)
to the first token from the new version, and the median request latency next to it (a
batch already running finishes first: the switch waits for at most one batch).

Reports requests/s, completion tokens/s, p50/p95 latency, and ratios against ``base``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _deltas(root: Path, n: int) -> list[str]:
    from slimtune.delta import DeltaStore
    from slimtune.testing import random_lora_delta

    store = DeltaStore(root / "store")
    out = []
    for seed in range(1, n + 1):
        random_lora_delta(root / f"d{seed}", seed)
        out.append(store.add(root / f"d{seed}").id)
    return out


def start_server(
    root: Path,
    device: str,
    max_batch: int,
    extra: tuple[str, ...] = (),
    *,
    site: Path | None = None,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen, str]:
    """``slimtune serve`` of the default model on ``root``/store, once healthy: the process
    and its URL. ``site``: a folder put first on the server's path (a ``sitecustomize``
    there runs as it starts); ``env``: more environment."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "slimtune", "serve", "--model", "default", "--device", device]
    cmd += ["--store", str(root / "store"), "--port", str(port), "--max-batch", str(max_batch)]
    cmd += list(extra)
    src = str(Path(__file__).resolve().parents[1] / "src")
    first = str(site) if site else ""
    path = os.pathsep.join(p for p in (first, src, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {}), "PYTHONPATH": path}
    log = root / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(360):
        if proc.poll() is not None:
            break
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)  # a refused connection or an unhealthy answer alike
    proc.kill()
    raise SystemExit("the server did not start:\n" + log.read_text()[-2000:])


def _scenario(url: str, models: list[str], clients: int, max_tokens: int) -> dict:
    import httpx

    def ask(model: str) -> tuple[float, int]:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "Write one sentence about the sea."}],
            "max_tokens": max_tokens,
        }
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
        r.raise_for_status()
        return time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]

    ask(models[0])  # warm
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(ask, models))
    wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in results)
    return {
        "requests_per_s": len(models) / wall,
        "tokens_per_s": sum(r[1] for r in results) / wall,
        "p50_s": statistics.median(lat),
        "p95_s": lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))],
    }


def _tag_switch(root: Path, url: str, a: str, b: str, moves: int, max_tokens: int) -> dict:
    import httpx

    from slimtune.delta import DeltaStore

    store = DeltaStore(root / "store")
    store.tag("prod", a)
    stop = threading.Event()
    seen: list[tuple[float, float, str]] = []  # (first token at, latency, version)
    body = {
        "model": "prod",
        "messages": [{"role": "user", "content": "Write one sentence about the sea."}],
        "max_tokens": max_tokens,
    }

    def loop() -> None:
        with httpx.Client() as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                first = None
                with c.stream(
                    "POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=600
                ) as r:
                    r.raise_for_status()
                    for line in r.iter_lines():
                        if first is None and line.startswith("data: {"):
                            first = time.perf_counter()  # the new version's first token
                done = time.perf_counter()
                seen.append((first or done, done - t0, r.headers["x-slimtune-delta"]))

    waits = []
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        runs = [pool.submit(loop) for _ in range(4)]
        time.sleep(2)
        for i in range(moves):
            new = b if i % 2 == 0 else a
            store.tag("prod", new)
            moved = time.perf_counter()
            while not any(t > moved and v == new for t, _, v in seen):
                if any(r.done() for r in runs) or time.perf_counter() - moved > 120:
                    stop.set()
                    for r in runs:
                        r.result()  # a client's error, raised here
                    raise SystemExit(f"no answer from {new} within 120 s of the tag move")
                time.sleep(0.005)
            waits.append(min(t for t, _, v in seen if t > moved and v == new) - moved)
            time.sleep(1)
        stop.set()
        for r in runs:
            r.result()
    return {
        "moves": moves,
        "switch_p50_s": statistics.median(waits),
        "switch_max_s": max(waits),
        "request_p50_s": statistics.median(lat for _, lat, _ in seen),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--deltas", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--moves", type=int, default=6, help="tag moves timed")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        versions = _deltas(root, args.deltas)
        n = args.requests
        mixed = [versions[i % len(versions)] for i in range(n)]
        proc, url = start_server(root, args.device, args.max_batch)
        try:
            rows = {
                "base": _scenario(url, ["base"] * n, args.clients, args.max_tokens),
                "1 delta": _scenario(url, [versions[0]] * n, args.clients, args.max_tokens),
                f"{args.deltas} deltas mixed": _scenario(url, mixed, args.clients, args.max_tokens),
            }
            switch = _tag_switch(root, url, versions[0], versions[1], args.moves, 8)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        proc, url = start_server(root, args.device, args.max_batch, ("--adapters", "0"))
        try:
            rows[f"{args.deltas} deltas mixed, --adapters 0"] = _scenario(
                url, mixed, args.clients, args.max_tokens
            )
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    base = rows["base"]
    print(
        f"slimtune serve, default model, {args.device}, {args.requests} requests, "
        f"{args.clients} clients, max_tokens {args.max_tokens}, --max-batch {args.max_batch}"
    )
    print("| scenario | requests/s | tokens/s | p50 s | p95 s | tokens/s vs base |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
            f"{r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x |"
        )

    print(
        f"\ntag switch ({switch['moves']} moves, 4 clients, max_tokens 8): first token from "
        f"the new version {switch['switch_p50_s']:.2f} s after the move (median; max "
        f"{switch['switch_max_s']:.2f} s); a request takes {switch['request_p50_s']:.2f} s "
        "(median)"
    )


if __name__ == "__main__":
    main()
