"""How long the store's commands take from a cold interpreter: each command in its own
process, several rounds in turn, median wall time; beside the same commands run from
another source tree (``--baseline-src``, e.g. an older commit's ``src`` from ``git
archive``), measured in the same rounds.

    python benchmarks/cli_start.py --rounds 3
    git archive 328f2e1 src | tar -x -C /tmp/old
    python benchmarks/cli_start.py --rounds 3 --baseline-src /tmp/old/src

It builds a store of three random deltas of the default model first (``--store``, kept).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
COMMANDS = [
    ["delta", "list"],
    ["delta", "tag", "v2", "prod"],
    ["delta", "rollback", "prod"],
    ["delta", "show", "v1"],
    ["--version"],
]


def build_store(store: Path) -> None:
    sys.path.insert(0, str(SRC))
    from slimtune.delta import DeltaStore
    from slimtune.testing import random_delta

    s = DeltaStore(store)
    if s.list():
        return
    for seed in (1, 2, 3):
        random_delta(store.parent / f"{store.name}-d{seed}", seed)
        s.add(store.parent / f"{store.name}-d{seed}")
    s.tag("prod", "v1")


def timed(src: str, store: Path, argv: list[str]) -> float:
    args = [sys.executable, "-m", "slimtune", *argv]
    if argv[0] == "delta":
        args[4:4] = ["--store", str(store)]
    env = {**os.environ, "PYTHONPATH": src, "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} ({src}): {proc.stderr.strip()[-300:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--store", default="/tmp/slimtune-cli-start/store")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline-src", help="another tree's src/ to time beside this one")
    args = ap.parse_args()
    store = Path(args.store)
    store.parent.mkdir(parents=True, exist_ok=True)
    build_store(store)
    trees = {"this tree": str(SRC)}
    if args.baseline_src:
        trees["baseline"] = args.baseline_src
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):  # each tree runs the sequence (tag, then rollback) in turn
        for name, src in trees.items():
            for argv in COMMANDS:
                times.setdefault((" ".join(argv), name), []).append(timed(src, store, argv))
    cols = list(trees)
    print("| command | " + " | ".join(f"{c}: median s" for c in cols) + " | ratio |")
    print("|---|" + "---|" * (len(cols) + 1))
    for argv in COMMANDS:
        cmd = " ".join(argv)
        med = [statistics.median(times[(cmd, c)]) for c in cols]
        ratio = f"{med[0] / med[1]:.2f}x" if len(med) == 2 else "-"
        print(f"| slimtune {cmd} | " + " | ".join(f"{m:.2f}" for m in med) + f" | {ratio} |")


if __name__ == "__main__":
    main()
