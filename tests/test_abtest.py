"""The A/B statistics against their textbook definitions."""

import math
import random

import numpy as np
import pytest

from slimtune.eval.abtest import compare, mcnemar_exact, paired_bootstrap


def _mcnemar_by_integers(only_a: int, only_b: int) -> float:
    n, k = only_a + only_b, min(only_a, only_b)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


@pytest.mark.parametrize("only_a,only_b", [(0, 1), (3, 9), (10, 10), (40, 25), (700, 640)])
def test_mcnemar_matches_the_exact_binomial_tail(only_a, only_b):
    rng = random.Random(only_a * 1000 + only_b)
    pairs = [(1, 0)] * only_a + [(0, 1)] * only_b + [(1, 1)] * 17 + [(0, 0)] * 11
    rng.shuffle(pairs)
    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    r = mcnemar_exact(a, b)
    assert (r["only_a"], r["only_b"]) == (only_a, only_b)
    assert r["p_value"] == pytest.approx(_mcnemar_by_integers(only_a, only_b), rel=1e-9)


def test_mcnemar_on_twenty_thousand_discordant_pairs_is_a_probability():
    a = np.r_[np.ones(10_300), np.zeros(9_700)]
    r = mcnemar_exact(a, 1 - a)
    # 2**20000 overflows a float: the log-space sum must still give a tiny, finite p
    assert 0.0 <= r["p_value"] < 1e-4 and math.isfinite(r["p_value"])


def test_bootstrap_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    a = rng.normal(0.0, 1.0, 4000)
    b = a + rng.normal(0.1, 0.5, 4000)
    r = paired_bootstrap(a, b, samples=2000, seed=3)
    d = b - a
    se = d.std(ddof=1) / math.sqrt(len(d))
    assert r["mean_diff"] == pytest.approx(d.mean())
    assert r["ci_low"] == pytest.approx(d.mean() - 1.96 * se, abs=0.25 * se)
    assert r["ci_high"] == pytest.approx(d.mean() + 1.96 * se, abs=0.25 * se)
    assert r == paired_bootstrap(a, b, samples=2000, seed=3)  # seeded: reproducible


def test_compare_names_the_winner_and_its_significance():
    a = [1] * 50 + [0] * 50
    b = [1] * 80 + [0] * 20
    v = compare(a, b, higher_is_better=True, binary=True)
    assert v["winner"] == "B" and v["significant"] and v["mcnemar"]["only_b"] == 30
    loss_a, loss_b = [2.0, 2.1, 1.9, 2.0], [2.0, 2.1, 1.9, 2.0]
    v = compare(loss_a, loss_b, higher_is_better=False, binary=False)
    assert v["winner"] == "tie" and not v["significant"]
    with pytest.raises(ValueError):
        compare([1, 0], [1], higher_is_better=True, binary=True)


def test_bootstrap_of_correctness_draws_counts_like_resampling_examples():
    """The multinomial shortcut for few distinct differences is the same distribution as
    resampling examples: compare both on the same data."""
    from slimtune.eval import abtest

    rng = np.random.default_rng(5)
    a = (rng.random(3000) < 0.7).astype(float)
    b = (rng.random(3000) < 0.74).astype(float)
    by_counts = paired_bootstrap(a, b, samples=4000, seed=1)
    few = abtest._FEW_VALUES
    try:
        abtest._FEW_VALUES = 0  # force the resampling path
        by_rows = paired_bootstrap(a, b, samples=4000, seed=1)
    finally:
        abtest._FEW_VALUES = few
    se = (b - a).std(ddof=1) / math.sqrt(len(a))
    assert by_counts["mean_diff"] == by_rows["mean_diff"]
    assert by_counts["ci_low"] == pytest.approx(by_rows["ci_low"], abs=0.15 * se)
    assert by_counts["ci_high"] == pytest.approx(by_rows["ci_high"], abs=0.15 * se)
