"""Time of the A/B statistics (paired bootstrap + McNemar) against the pure-Python baseline,
for correctness scores (diffs in {-1, 0, 1}: drawn as category counts) and for per-example
losses (drawn as resampled rows).

The baseline is the v0.1 implementation, kept here as it was: a Python loop over
2,000 resamples of n examples, and McNemar's tail as exact integer binomials.

    python benchmarks/abtest_stats.py --examples 20000
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def baseline_bootstrap(a, b, samples=2000, seed=0):
    diffs = [y - x for x, y in zip(a, b)]
    n = len(diffs)
    rng = random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    return means[int(0.025 * samples)], means[int(0.975 * samples) - 1]


def baseline_mcnemar(a, b):
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    n, k = only_a + only_b, min(only_a, only_b)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--examples", type=int, default=20000)
    args = ap.parse_args()
    from slimtune.eval.abtest import mcnemar_exact, paired_bootstrap

    rng = random.Random(0)
    n = args.examples
    cases = {
        "correctness (accuracy, exact match)": (
            [int(rng.random() < 0.80) for _ in range(n)],
            [int(rng.random() < 0.82) for _ in range(n)],
        ),
        "per-example loss": (
            [rng.gauss(2.0, 0.5) for _ in range(n)],
            [rng.gauss(1.98, 0.5) for _ in range(n)],
        ),
    }
    print(f"examples: {n}, 2000 bootstrap samples")
    for name, (a, b) in cases.items():
        binary = name.startswith("correctness")
        t0 = time.perf_counter()
        lo, hi = baseline_bootstrap(a, b)
        if binary:
            baseline_mcnemar(a, b)
        t_base = time.perf_counter() - t0
        t0 = time.perf_counter()
        r = paired_bootstrap(a, b)
        if binary:
            mcnemar_exact(a, b)
        t_new = time.perf_counter() - t0
        print(
            f"{name}: baseline {t_base:.2f} s (CI [{lo:+.4f}, {hi:+.4f}]), slimtune "
            f"{t_new:.3f} s (CI [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]): "
            f"{t_base / t_new:.0f}x"
        )


if __name__ == "__main__":
    main()
