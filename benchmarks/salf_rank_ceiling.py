"""How high can any SALF gain model's Spearman go against measured scores?

SALF's predicted gain G(k) can only stay level or fall as the cut k rises (freezing more
layers never adds a layer to train), so against the mean scores of the cuts measured, the
best rank correlation any such model can reach is that of the best non-increasing
sequence: tie blocks of neighbouring cuts, each block below the one before. Where the
scores of neighbouring cuts go up and down within their seeds' noise, that ceiling sits
below a Spearman bar however good the model is.

    python benchmarks/salf_rank_ceiling.py 95.4,94.6,96.7,94.7,93.2      # scores by cut, k ascending
"""

from __future__ import annotations

import argparse
import itertools
import math

from rank_stats import spearman


def ceiling(scores: list[float]) -> tuple[float, list[int]]:
    """The highest Spearman of a non-increasing, not constant G against ``scores`` (cuts in
    ascending order), and that G's levels; NaN where the scores are all equal (no ranking)."""
    if len(set(scores)) < 2:
        return math.nan, []
    best: tuple[float, list[int]] = (-2.0, [])
    n = len(scores)
    for steps in itertools.product((0, 1), repeat=n - 1):  # 1: a step down after this cut
        if not any(steps):
            continue
        levels = [n - sum(steps[:i]) for i in range(n)]
        rho = spearman([float(x) for x in levels], scores)
        if rho > best[0]:
            best = (rho, levels)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("scores", help="mean score of each cut, comma-separated, cuts ascending")
    scores = [float(x) for x in ap.parse_args().scores.split(",")]
    if len(scores) < 2:
        raise SystemExit("give at least two scores")
    if len(scores) > 20:  # 2^(n-1) sequences are tried
        raise SystemExit("at most 20 cuts")
    rho, levels = ceiling(scores)
    if math.isnan(rho):
        raise SystemExit("every score is the same: no ranking to correlate with")
    strict = spearman([float(-i) for i in range(len(scores))], scores)
    print(
        f"any strictly falling G: {strict:.2f}; the best non-increasing G: {rho:.2f} (levels {levels})"
    )


if __name__ == "__main__":
    main()
