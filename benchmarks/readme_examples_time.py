"""How long each of the README's tested examples takes, run as ``tests/test_readme.py``
runs them (two at a time, a torch thread each, named groups in order): the test is the
suite's longest, and this says which example to make cheaper.

    python benchmarks/readme_examples_time.py [--workers N]

Prints one line per example (seconds, start offset, exit code, first line) and the total.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from tests.test_readme import WORKERS, blocks, command, environment, sequences

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=WORKERS)  # the test's
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="readme-examples-"))
    env = environment(args.workers)
    start = time.perf_counter()

    def run(group: list[tuple[str, str]]) -> None:
        for lang, code in group:
            t0 = time.perf_counter()
            proc = subprocess.run(
                command(lang, code), cwd=tmp, env=env, capture_output=True, text=True
            )
            first = code.strip().splitlines()[0][:90]
            print(
                f"{time.perf_counter() - t0:7.1f} s  start {t0 - start:6.1f}  rc={proc.returncode}  {first}",
                flush=True,
            )

    groups = sorted(sequences(blocks()), key=len, reverse=True)  # as the test orders them
    with ThreadPoolExecutor(args.workers) as pool:
        list(pool.map(run, groups))
    print(f"total {time.perf_counter() - start:.1f} s (examples' files in {tmp})")


if __name__ == "__main__":
    main()
