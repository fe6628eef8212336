"""How often a DDP process's micro-batch could be served by its own frozen-layer cache.

A probe for a design not built: under DDP each process keeps the frozen layers' output of
the examples it computed, and a micro-batch skips the frozen layers only when all of its
examples are kept *in that process*. Today each process takes a contiguous part of the
global batch (trainer ``_micro_batch``), so an example lands on a random process every
epoch. The alternative simulated here hands each example to process ``example % N`` where
that process' share has room (the global batch, and so the gradient, stays the same).
Pure Python, the trainer's batch sizes but a plain shuffle per epoch:

    python benchmarks/ddp_cache_coverage.py --examples 720 --epochs 4
"""

from __future__ import annotations

import argparse
import random


def shares(batch: list[int], world: int, owner: bool) -> list[list[int]]:
    """One global batch split into per-process shares of the trainer's sizes."""
    part, extra = divmod(len(batch), world)
    sizes = [part + (r < extra) for r in range(world)]
    if not owner:
        starts = [r * part + min(r, extra) for r in range(world)]
        return [batch[s : s + n] for s, n in zip(starts, sizes)]
    out: list[list[int]] = [[] for _ in range(world)]
    rest = []
    for i in batch:
        home = out[i % world]
        (home if len(home) < sizes[i % world] else rest).append(i)
    for share, n in zip(out, sizes):
        while len(share) < n:
            share.append(rest.pop(0))
    return out


def served_per_epoch(
    examples: int, world: int, batch: int, epochs: int, owner: bool, seed: int = 0
) -> list[float]:
    """Share of micro-batches served from their process' cache, epoch by epoch."""
    rng = random.Random(seed)
    caches: list[set[int]] = [set() for _ in range(world)]
    rates = []
    for _ in range(epochs):
        order = list(range(examples))
        rng.shuffle(order)
        served = total = 0
        for start in range(0, examples, world * batch):
            for cache, share in zip(
                caches, shares(order[start : start + world * batch], world, owner)
            ):
                if not share:
                    continue
                total += 1
                if all(i in cache for i in share):
                    served += 1
                else:
                    cache.update(share)
        rates.append(served / total)
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--examples", type=int, default=720)
    ap.add_argument("--epochs", type=int, default=4)
    args = ap.parse_args()
    print("| processes x batch | contiguous shares, served per epoch | owner shares |")
    print("|---|---|---|")
    for world, batch in [(2, 4), (2, 8), (4, 4), (8, 2)]:
        cells = [
            ", ".join(
                f"{r:.0%}" for r in served_per_epoch(args.examples, world, batch, args.epochs, o)
            )
            for o in (False, True)
        ]
        print(f"| {world} x {batch} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
