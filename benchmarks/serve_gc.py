"""Does Python's collector pause `slimtune serve`? (The question steady_gc answered for
training: a full collection walks about half a million objects.)

    python benchmarks/serve_gc.py --device cpu --requests 64 --clients 4

Starts ``slimtune serve`` on the base model with a ``sitecustomize`` that times every
collection (``gc.callbacks``) into a log, sends ``--requests`` chat requests (16 tokens,
``--clients`` at a time) once the server is healthy, and prints, for the load only, the
collections per generation with their total and longest pause, beside the requests'
latency.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import start_server  # benchmarks/, the script's folder

HOOK = """
import gc, os, time
_log = open(os.environ["SLIMTUNE_GC_LOG"], "a", buffering=1)
_start = [0.0]
def _timed(phase, info):
    if phase == "start":
        _start[0] = time.perf_counter()
    else:
        _log.write(f"{info['generation']} {1000 * (time.perf_counter() - _start[0]):.3f}\\n")
gc.callbacks.append(_timed)
"""


def main() -> None:
    import httpx

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--clients", type=int, default=4)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="serve-gc-"))
    (tmp / "sitecustomize.py").write_text(HOOK)
    log = tmp / "gc.log"
    # serve's default batch (8); the hook times the server's collections from its start
    proc, url = start_server(tmp, args.device, 8, site=tmp, env={"SLIMTUNE_GC_LOG": str(log)})
    try:

        def ask(i: int) -> float:
            t0 = time.perf_counter()
            body = {
                "model": "base",
                "messages": [
                    {"role": "user", "content": f"Write one sentence about the sea ({i})."}
                ],
                "max_tokens": 16,
            }
            httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600).raise_for_status()
            return time.perf_counter() - t0

        ask(0)  # warm
        before = len(log.read_text().splitlines())
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            latency = sorted(pool.map(ask, range(1, args.requests + 1)))
        wall = time.perf_counter() - t0
        during = [line.split() for line in log.read_text().splitlines()[before:]]
    finally:
        proc.terminate()
        proc.wait()
    p95 = latency[round(0.95 * (len(latency) - 1))]
    print(
        f"{args.requests} requests in {wall:.1f} s: latency p50 {statistics.median(latency):.3f} s, "
        f"p95 {p95:.3f} s, max {latency[-1]:.3f} s"
    )
    for gen in ("0", "1", "2"):
        pauses = [float(ms) for g, ms in during if g == gen]
        longest = f", longest {max(pauses):.1f} ms" if pauses else ""
        print(f"  generation {gen}: {len(pauses)} collections, {sum(pauses):.1f} ms{longest}")


if __name__ == "__main__":
    main()
